"""Strict request checking for the OpenAI-compatible server.

vLLM accepts and silently drops request fields it does not know (``"max_tokns": 5`` runs
with the default ``max_tokens``). With ``--strict-request-fields`` (opt-in, independent of
``--jacobi``, which changes nothing of the API) the server answers such requests with
``400`` naming the fields, as the OpenAI API does, so that no request runs with settings
other than those its client asked for. It is an ordinary vLLM ``--middleware``
(``--middleware cllm_vllm.server.reject_unknown_fields`` does the same).
"""

from __future__ import annotations

import functools
import json

MIDDLEWARE = "cllm_vllm.server.reject_unknown_fields"


@functools.cache
def _known_fields() -> dict[str, frozenset[str]]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    def names(model) -> frozenset[str]:
        out = set()
        for name, field in model.model_fields.items():
            out.add(name)
            if field.alias:
                out.add(field.alias)
        return frozenset(out)

    return {
        "/v1/completions": names(CompletionRequest),
        "/v1/chat/completions": names(ChatCompletionRequest),
    }


def unknown_fields(path: str, body: object) -> list[str]:
    known = _known_fields().get(path)
    if known is None or not isinstance(body, dict):
        return []
    return sorted(set(body) - known)


async def reject_unknown_fields(request, call_next):
    if request.method == "POST" and request.url.path in ("/v1/completions",
                                                         "/v1/chat/completions"):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # malformed JSON: vLLM's own handler answers 400
        bad = unknown_fields(request.url.path, body)
        if bad:
            from starlette.responses import JSONResponse

            return JSONResponse(
                status_code=400,
                content={"error": {
                    "message": f"Unrecognized request argument(s): {', '.join(bad)}",
                    "type": "BadRequestError", "param": bad[0], "code": 400}},
            )
    return await call_next(request)

"""Which path runs which endpoint of the serving object (serve/api/serving.py), with the OpenAPI tags and the request
bodies' schemas (the bodies are parsed by hand, for 415/413/400 control, so FastAPI does not see them)."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from serve.api.protocol import ChatCompletionRequest, CompletionRequest
from serve.api.serving import OpenAIServing


def _body_schema(model_cls: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model_cls.__name__}"}}}}}


def register(app: FastAPI, serving: OpenAIServing) -> None:
    app.add_api_route("/healthz", serving.healthz, methods=["GET"], tags=["probes"])
    app.add_api_route("/readyz", serving.readyz, methods=["GET"], tags=["probes"])
    # the probes vLLM's OpenAI server answers, for tools built for it
    app.add_api_route("/health", serving.health, methods=["GET"], tags=["probes"])
    app.add_api_route("/version", serving.version, methods=["GET"], tags=["probes"])
    app.add_api_route("/metrics", serving.prometheus, methods=["GET"], tags=["probes"])
    app.add_api_route("/plan", serving.plan, methods=["GET"], tags=["gpuplan"])
    app.add_api_route("/admin/drain", serving.drain, methods=["POST"], tags=["gpuplan"])
    app.add_api_route("/v1/models", serving.list_models, methods=["GET"], tags=["openai"])
    app.add_api_route("/v1/models/{model_id:path}", serving.get_model, methods=["GET"], tags=["openai"])
    app.add_api_route("/v1/chat/completions", serving.chat_completions, methods=["POST"], tags=["openai"],
                      openapi_extra=_body_schema(ChatCompletionRequest))
    app.add_api_route("/v1/completions", serving.completions, methods=["POST"], tags=["openai"],
                      openapi_extra=_body_schema(CompletionRequest))

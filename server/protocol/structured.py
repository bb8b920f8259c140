"""Structured output on the wire: OpenAI's `response_format` (json_object, json_schema; the Responses API's
`text.format`) and vLLM's `structured_outputs` (json, regex, choice, grammar), and the engine OutputFormat each
one asks for. Whether a schema, regex or grammar compiles is the engine's check (a 400 naming the field)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from famserve.engine.structured import OutputFormat, json_schema_format

from .base import OpenAIBaseModel, OpenAIName, invalid

ANY_OBJECT = {"type": "object"}


class JsonSchemaFormat(OpenAIBaseModel):
    name: OpenAIName = Field(description="the schema's name")
    description: str | None = Field(None, description="what the output is for; accepted and not used")
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the output follows")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced token by token")


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text (default), json_object (any JSON object) or json_schema")
    json_schema: JsonSchemaFormat | None = Field(None, description="with type json_schema: the schema")
    _schema_param: str = PrivateAttr("response_format.json_schema.schema")  # where the schema was, for errors

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise invalid("type json_schema needs json_schema: {\"name\": ..., \"schema\": {...}}")
        if self.type != "json_schema" and self.json_schema is not None:
            raise invalid(f"json_schema is only allowed with type json_schema, not {self.type!r}")
        return self

    def output_format(self) -> OutputFormat | None:
        if self.type == "json_object":
            return json_schema_format(ANY_OBJECT, "response_format")
        if self.type == "json_schema":
            return json_schema_format(self.json_schema.schema_, self._schema_param)
        return None


class TextFormat(OpenAIBaseModel):
    """The Responses API's `text.format`: response_format with the schema's fields beside its type."""

    type: Literal["text", "json_object", "json_schema"] = Field(description="as response_format's type")
    name: OpenAIName | None = Field(None, description="with json_schema")
    description: str | None = Field(None, description="accepted and not used")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="with json_schema: the schema")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced token by token")

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise invalid("type json_schema needs name and schema")
        return self

    def response_format(self) -> ResponseFormat:
        schema = JsonSchemaFormat(name=self.name, schema=self.schema_) if self.type == "json_schema" else None
        response_format = ResponseFormat(type=self.type, json_schema=schema)
        response_format._schema_param = "text.format.schema"
        return response_format


class ResponseText(OpenAIBaseModel):
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))


class StructuredOutputs(OpenAIBaseModel):
    """vLLM's extension: exactly one of the four."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema (object or JSON text)")
    regex: str | None = Field(None, description="a regular expression the whole output matches (Rust syntax)")
    choice: list[str] | None = Field(None, min_length=1, description="the output is exactly one of these")
    grammar: str | None = Field(None, description="a Lark or GBNF (llama.cpp) grammar the output is a sentence of")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if len(given) != 1:
            raise invalid("give exactly one of json, regex, choice and grammar")
        return self

    def output_format(self) -> OutputFormat:
        if self.json_ is not None:
            return json_schema_format(self.json_, "structured_outputs.json")
        if self.regex is not None:
            return OutputFormat("regex", self.regex, "structured_outputs.regex")
        if self.choice is not None:
            return OutputFormat("choice", json.dumps(self.choice), "structured_outputs.choice")
        return OutputFormat("grammar", self.grammar, "structured_outputs.grammar")


def output_format(response_format: ResponseFormat | None,
                  structured_outputs: StructuredOutputs | None) -> OutputFormat | None:
    """The one format a request asks for (None: free text); ValueError("field: ...") when it asks for two."""
    from_response = response_format.output_format() if response_format is not None else None
    if from_response is not None and structured_outputs is not None:
        raise ValueError("structured_outputs: give it or a JSON response_format, not both")
    return from_response or (structured_outputs.output_format() if structured_outputs is not None else None)

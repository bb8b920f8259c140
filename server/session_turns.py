"""The commit rules of work inside a session: what a completion, a chat turn or an append leaves in the stream.

Generation never runs on the session's own state. The prompt except its last token is committed first; the rest
runs on a throw-away copy; then exactly the tokens the session should hold are committed: for a completion the last
prompt token plus every generated token, for a chat turn the reply as the chat template renders it. So a stop
string, a disconnect or an engine error never leaves half a turn behind, and after k chat turns the session holds
exactly the tokens of the whole conversation rendered by the template."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from famserve.engine.errors import InvalidRequestError
from famserve.engine.tokenizer import Tokenizer

from .errors import APIError
from .generation import ChoiceDelta, GenerationService, Job
from .protocol.sessions import (AppendRequest, AppendResponse, FamSettings, SessionChatRequest,
                                SessionCompletionRequest, SessionInfo)
from .sessions import Session, SessionManager
from .store import SessionRecord
from .streaming import cancel_on_disconnect, sse_response, start_stream

TEXT_PIECE_CHARS = 1 << 16  # a streamed text body is tokenized in pieces of about this size, cut at line breaks


def session_info(record: SessionRecord, state_bytes: int, block_size: int) -> SessionInfo:
    fam = record.fam_config
    return SessionInfo(id=record.id, model=record.model_id, created_at=int(record.created_at),
                       last_used_at=int(record.last_used_at), tokens_processed=record.tokens_processed,
                       state_bytes=state_bytes, blocks=record.tokens_processed // block_size, turns=record.turns,
                       metadata=record.metadata,
                       fam=FamSettings(mode=fam["mode"], block_size=fam["block_size"],
                                       memory_blocks=fam["memory_blocks"],
                                       fam_length=fam["fam_length"] if fam["mode"] == "fam" else 0,
                                       sink_tokens=fam["sink_tokens"] if fam["mode"] != "full" else 0,
                                       fam_after_window=fam.get("fam_after_window", False) and fam["mode"] == "fam"))


async def text_chunks(body: AsyncIterator[bytes], tokenizer: Tokenizer) -> AsyncIterator[list[int]]:
    """Tokenize a streamed UTF-8 body piece by piece, cutting at line breaks so tokens match the whole text's."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    pending = ""
    try:
        async for raw in body:
            pending += decoder.decode(raw)
            while len(pending) >= TEXT_PIECE_CHARS:
                cut = pending.rfind("\n", 0, len(pending) - 1) + 1 or len(pending)
                piece, pending = pending[:cut], pending[cut:]
                yield tokenizer.encode(piece)
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise APIError(f"body: not valid UTF-8 text ({e.reason} at byte {e.start})", code="invalid_body") from None
    if pending:
        yield tokenizer.encode(pending)


def _no_check(record: SessionRecord) -> None:
    return None


@dataclass(frozen=True)
class Answer:
    """How a turn is answered: `whole(job, choices)` is the body of a plain answer, `stream(job, deltas)` the
    response of a streamed one. `check(record)` runs first, with the session held, and may refuse the turn."""

    whole: Callable[[Job, list[ChoiceDelta]], BaseModel]
    stream: Callable[[Job, AsyncIterator[ChoiceDelta]], Response]
    check: Callable[[SessionRecord], None] = _no_check


def _include_usage(stream_options) -> bool:
    return bool(stream_options and stream_options.include_usage)


@dataclass
class SessionTurns:
    manager: SessionManager
    service: GenerationService
    owner: str

    def info(self, record: SessionRecord) -> SessionInfo:
        model = self.manager.model
        return session_info(record, model.state_nbytes, model.layout.block_size)

    # --- append --------------------------------------------------------------------------------------------------

    async def token_chunks(self, body: AppendRequest) -> AsyncIterator[list[int]]:
        if body.token_ids is not None:
            bad = next((t for t in body.token_ids if not 0 <= t < self.service.vocab_size), None)
            if bad is not None:
                raise APIError(f"token_ids: token id {bad} is outside the vocabulary", param="token_ids")
            yield list(body.token_ids)
        elif body.text is not None:
            yield self.service.tokenizer.encode(body.text)
        else:
            raise APIError("give text or token_ids to append", code="invalid_value", param="text")

    async def append(self, session_id: str, chunks: AsyncIterator[list[int]]) -> AsyncIterator[AppendResponse]:
        async with self.manager.mutate(self.owner, session_id) as session:
            done = 0
            async for done in self.manager.append_chunks(session, chunks):
                session.record.tokens_processed = session.state.num_tokens
                yield AppendResponse(tokens_appended=done, session=self.info(session.record))
            if done == 0:
                yield AppendResponse(tokens_appended=0, session=self.info(session.record))

    # --- generation ----------------------------------------------------------------------------------------------

    async def completion(self, session_id: str, body: SessionCompletionRequest, request: Request) -> Response:
        from .routes.completions import _chunks, _choice

        body = body.model_copy(update={"model": body.model or self.service.model_name})
        many = isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], (str, list))
        if (body.n or 1) != 1 or body.echo or many:
            raise APIError("session completions take one prompt (a string or a list of token ids), n = 1 and no "
                           "echo", code="unsupported_parameter")

        async def make_job(session: Session) -> Job:
            return await self.service.completion_job(body)

        async def commit(session: Session, last: int, choice: ChoiceDelta) -> None:
            await self.manager.consume(session, [last, *choice.token_ids])

        include_usage = _include_usage(body.stream_options)
        answer = Answer(whole=lambda job, choices: self._completion_response(job, choices, _choice),
                        stream=lambda job, deltas: sse_response(_chunks(job, self.service, deltas, include_usage)))
        return await self._run(session_id, make_job, body.commit, bool(body.stream), request, commit, answer)

    async def chat(self, session_id: str, body: SessionChatRequest, request: Request,
                   answer: Answer | None = None) -> Response:
        """One committed chat turn, answered as OpenAI's chat completions unless `answer` says otherwise."""
        from .routes.chat import _chunks

        body = body.model_copy(update={"model": body.model or self.service.model_name})
        if (body.n or 1) != 1:
            raise APIError("session chat takes n = 1", code="unsupported_parameter", param="n")
        if body.tools or any(m.role == "tool" or m.tool_calls for m in body.messages):
            # Their description would have to stay in the session's stream, turn after turn.
            raise APIError("tools are not supported in sessions: use chat completions without a session",
                           code="unsupported_parameter", param="tools" if body.tools else "messages")
        messages = body.template_messages()
        tokenizer = self.service.tokenizer
        anchor: list[dict] = []

        async def make_job(session: Session) -> Job:
            # The template's rendering of the anchor plus the new messages, minus the anchor alone, is what it adds
            # after everything the session holds (chat templates render each message on its own).
            anchor[:] = session.record.anchor_messages
            ids = tokenizer.encode(_extension(tokenizer, anchor, messages, generation_prompt=True))
            return self.service.session_job("chatcmpl", body, ids)

        async def commit(session: Session, last: int, choice: ChoiceDelta) -> None:
            reply = {"role": "assistant", "content": choice.text}
            closing = _extension(tokenizer, anchor + messages, [reply], generation_prompt=False,
                                 after_generation_prompt=True)
            await self.manager.consume(session, [last, *tokenizer.encode(closing)])
            session.record.turns += 1
            if not session.record.anchor_messages:
                session.record.anchor_messages = messages[:1]

        if answer is None:
            include_usage = _include_usage(body.stream_options)
            answer = Answer(whole=self._chat_response,
                            stream=lambda job, deltas: sse_response(_chunks(job, self.service, deltas, include_usage)))
        return await self._run(session_id, make_job, True, bool(body.stream), request, commit, answer)

    async def _run(self, session_id: str, make_job, commit_result: bool, stream: bool, request: Request, commit,
                   answer: Answer) -> Response:
        """Hold the session for the whole turn (a stream holds it until its last delta)."""
        stack = AsyncExitStack()
        session = await stack.enter_async_context(self.manager.mutate(self.owner, session_id))
        try:
            answer.check(session.record)
            job = await make_job(session)
            prompt = job.prompts[0]
            if commit_result:  # the prompt but its last token goes in now; generation runs on a copy
                await self.manager.consume(session, prompt[:-1])
                job.prompts = [prompt[-1:]]
            scratch = self.manager.scratch_copy(session)
            stack.callback(self.manager.release_scratch, scratch)
            job.state = scratch
        except BaseException:
            await stack.aclose()
            raise

        async def finish(choice: ChoiceDelta) -> None:
            if commit_result:
                await commit(session, prompt[-1], choice)

        if stream:
            deltas = await start_stream(request, self._stream_and_commit(job, finish, stack))
            return answer.stream(job, deltas)
        async with stack:
            choices = await cancel_on_disconnect(request, self.service.collect(job))
            await finish(choices[0])
        return JSONResponse(answer.whole(job, choices).model_dump(mode="json"))

    async def _stream_and_commit(self, job: Job, finish, stack: AsyncExitStack) -> AsyncIterator[ChoiceDelta]:
        """The deltas of a streamed turn; the session is released when they end (before any closing event)."""
        async with stack:
            whole = ChoiceDelta(0)
            async with aclosing(self.service.stream(job)) as deltas:
                async for delta in deltas:
                    whole.text += delta.text
                    whole.token_ids += delta.token_ids
                    if delta.finish_reason is not None:
                        await finish(whole)  # committed before the client sees the end of the stream
                    yield delta

    def _completion_response(self, job, choices, make_choice):
        from .protocol import CompletionResponse, FamserveInfo

        return CompletionResponse(id=job.id, created=job.created, model=self.service.model_name,
                                  usage=job.final_usage(), famserve=FamserveInfo(mode=self.service.mode),
                                  choices=[make_choice(job, c, "", 0) for c in choices])

    def _chat_response(self, job, choices):
        from .protocol import AssistantMessage, ChatChoice, ChatCompletionResponse, FamserveInfo
        from .routes.chat import _logprobs

        return ChatCompletionResponse(
            id=job.id, created=job.created, model=self.service.model_name, usage=job.final_usage(),
            famserve=FamserveInfo(mode=self.service.mode),
            choices=[ChatChoice(index=c.index, message=AssistantMessage(content=c.text), logprobs=_logprobs(job, c),
                                finish_reason=c.finish_reason) for c in choices])


def _extension(tokenizer: Tokenizer, before: list[dict], new: list[dict], *, generation_prompt: bool,
               after_generation_prompt: bool = False) -> str:
    """The text the chat template adds when `new` messages follow `before`."""
    base = tokenizer.render_chat(before, add_generation_prompt=after_generation_prompt) if before else ""
    full = tokenizer.render_chat(before + new, add_generation_prompt=generation_prompt)
    if not full.startswith(base):
        raise InvalidRequestError("this model's chat template does not extend a conversation turn by turn, so "
                                  "sessions cannot chat with it (append text and use completions instead)")
    return full[len(base):]



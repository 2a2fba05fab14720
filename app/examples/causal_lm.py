"""A Hugging Face causal language model that streams its text, with continuous batching.

One file, served with::

    WORKER_CLASS=app.examples.causal_lm:CausalLM MODEL_NAME=org/name make serve
    curl -N -H 'accept: text/event-stream' -H 'content-type: application/json' \\
        -d '{"prompt": "Once upon a time", "max_tokens": 32}' http://127.0.0.1:8000/predict

``MODEL_NAME`` is a hub id or a local directory holding a model and its tokenizer
(``save_pretrained``); ``MODEL_WEIGHTS``: ``auto`` / ``pretrained`` load its weights,
``random`` builds the same architecture from its config with random weights, a file path
(``.safetensors``, ``.pth``) loads that state dict into it. Offline, make a tiny random model
first (``python -m app.examples.causal_lm make-tiny .models/tiny-lm``) and serve that
directory.

Every request is one stream. All the streams of a worker share one forward step per token:
a new stream is prefilled alone, then joins the running batch at the next step, and a stream
that ends (its ``max_tokens``, a stop string, the end-of-text token, or a client that left)
leaves it without waiting for the others. The key/value cache of the batch is left-padded
and masked, with positions per row, so a stream gets exactly the tokens it would alone.
"""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.contract import InvalidInputError, ModelWorker, WorkerConfig
from app.runtime import TorchRuntime
from app.weights import read_state_dict, settle_offline_mode, warn_random

if TYPE_CHECKING:
    import torch

# ---- what the server sees ------------------------------------------------------------------


class LMSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LM_")

    max_tokens: int = Field(4096, ge=1, description="the most tokens one request may ask for")
    max_prompt_tokens: int = Field(8192, ge=1, description="the longest prompt, in tokens")


class ChatMessage(BaseModel):
    role: str = Field(min_length=1, max_length=64)
    content: str = Field(max_length=1_000_000)


class GenerateRequest(BaseModel):
    """A prompt, or chat messages turned into one by the tokenizer's chat template."""

    prompt: str | None = Field(None, max_length=1_000_000)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=1024)
    max_tokens: int = Field(64, ge=1, description="tokens to write at most")
    temperature: float = Field(0.0, ge=0, le=2, description="0 picks the likeliest token")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, description="makes sampling repeatable")
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, max_length=8, description="strings that end the text (not included)")
    stream: bool = Field(False, description="answer with server-sent events as text comes")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class TextChunk(BaseModel):
    """A piece of the text, as it is written."""

    text: str = Field(description="new text since the previous chunk")
    tokens: int = Field(description="tokens this chunk adds")
    finish_reason: Literal["stop", "length"] | None = Field(
        None, description="set on the last chunk: a stop string or end of text, or max_tokens")
    prompt_tokens: int | None = Field(None, description="set on the first chunk")


class GenerateAnswer(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"] | None
    prompt_tokens: int
    completion_tokens: int


# ---- continuous batching ---------------------------------------------------------------------


@dataclass(eq=False)
class Sequence:
    """One stream being written: its prompt, its sampling, what is still to be sent."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    generated: list[int] = field(default_factory=list)
    generator: Any = None
    ready: list[int] = field(default_factory=list)  # tokens written, not yet sent
    sent_text: str = ""
    sent_tokens: int = 0
    finished: str | None = None


class BatchDecoder:
    """The key/value cache of every active sequence, as one left-padded batch.

    ``join`` prefills a sequence alone and merges its cache into the batch; ``step`` runs
    one forward for the batch and gives the sequences asked for their next token (the rows
    not asked for, such as streams paused for a slow reader, are masked out of that column);
    ``leave`` drops rows and trims columns only padding uses.
    """

    def __init__(self, model: Any, device: torch.device) -> None:
        import torch

        self.model = model
        self.device = device
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.rows: list[Sequence] = []
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self._pos = torch.zeros((0,), dtype=torch.long, device=device)
        self._next = torch.zeros((0,), dtype=torch.long, device=device)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 layers: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, Any]:
        from transformers import DynamicCache

        cache = DynamicCache(layers) if layers else DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self._cache_arg: cache})
        # The cache passed in grows in place; reading it back from the output would go
        # through an attribute newer transformers deprecate.
        return out.logits[:, -1, :], [(layer.keys, layer.values) for layer in cache.layers]

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        import torch

        if seq.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / seq.temperature, dim=-1)
        if seq.top_p < 1.0:  # nucleus: the fewest tokens whose probability reaches top_p
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < seq.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def join(self, seq: Sequence) -> None:
        """Prefill ``seq`` alone and add it to the batch, its first token ready."""
        import torch

        if seq.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.seed)
        n = len(seq.prompt_ids)
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
        mask = torch.ones((1, n), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits, layers = self._forward(ids, mask, torch.arange(n, device=self.device)[None],
                                           [])
        token = self._sample(seq, logits[0])
        if self.rows:
            width = max(self._mask.shape[1], n)
            self._layers = [
                (torch.cat([_left_pad(k0, width), _left_pad(k1, width)]),
                 torch.cat([_left_pad(v0, width), _left_pad(v1, width)]))
                for (k0, v0), (k1, v1) in zip(self._layers, layers, strict=True)]
            self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        else:
            self._layers, self._mask = layers, mask
        self._pos = torch.cat([self._pos, self._pos.new_tensor([n])])
        self._next = torch.cat([self._next, self._next.new_tensor([token])])
        self.rows.append(seq)
        seq.generated.append(token)
        seq.ready.append(token)

    def step(self, wanted: list[Sequence]) -> None:
        """One forward for the batch; each sequence of ``wanted`` gets its next token."""
        import torch

        take = torch.tensor([seq in wanted for seq in self.rows], device=self.device)
        mask = torch.cat([self._mask, take[:, None].long()], dim=1)
        with torch.inference_mode():
            logits, self._layers = self._forward(self._next[:, None], mask, self._pos[:, None],
                                                 self._layers)
        self._mask = mask
        self._pos = self._pos + take.long()
        nxt = self._next.tolist()
        for i, seq in enumerate(self.rows):
            if seq in wanted:
                token = self._sample(seq, logits[i])
                nxt[i] = token
                seq.generated.append(token)
                seq.ready.append(token)
        self._next = self._next.new_tensor(nxt)

    def leave(self, seq: Sequence) -> None:
        """Drop ``seq`` from the batch."""
        import torch

        keep = [i for i, row in enumerate(self.rows) if row is not seq]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask[index]
        used = (mask.sum(dim=0) > 0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        self._mask = mask[:, start:]
        self._layers = [(k[index, :, start:], v[index, :, start:]) for k, v in self._layers]
        self._pos, self._next = self._pos[index], self._next[index]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence dimension (2 of a cache tensor, 1 of a mask) with zeros on the left."""
    import torch

    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


# ---- the worker -----------------------------------------------------------------------------


class CausalLM(ModelWorker):
    """A causal language model: writes text for a prompt or a chat, token by token."""

    default_model = "gpt2"
    settings_model = LMSettings
    chunk_model = TextChunk
    task = "text-generation"

    @classmethod
    def to_stream(cls, request: GenerateRequest) -> dict[str, Any]:
        return request.model_dump(exclude={"stream"})

    @classmethod
    def to_answer(cls, request: GenerateRequest, chunks: list[TextChunk]) -> GenerateAnswer:
        return GenerateAnswer(
            text="".join(c.text for c in chunks),
            finish_reason=chunks[-1].finish_reason if chunks else None,
            prompt_tokens=chunks[0].prompt_tokens or 0 if chunks else 0,
            completion_tokens=sum(c.tokens for c in chunks))

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        started = time.monotonic()
        self.settings: LMSettings = config.options or LMSettings.model_construct()
        self.runtime = TorchRuntime(config)
        self.model, weights, source = load_causal_lm(config.model_name, config.weights)
        self.model.to(self.runtime.device, self.runtime.dtype).eval()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(config.model_name)
        self.decoder = BatchDecoder(self.model, self.runtime.device)
        return {**self.runtime.info(self.model), "model": config.model_name,
                "weights": weights, "weights_source": source,
                "chat_template": self.tokenizer.chat_template is not None,
                "load_seconds": round(time.monotonic() - started, 2)}

    # The pool calls these three: a stream opens, every active stream takes one step per
    # forward, a stream closes (finished, failed, or its reader left).

    def stream_open(self, request: dict[str, Any]) -> Sequence:
        ids = self._prompt_ids(request)
        limit = min(int(request["max_tokens"]), self.settings.max_tokens)
        seq = Sequence(prompt_ids=ids, max_tokens=limit,
                       temperature=request["temperature"], top_p=request["top_p"],
                       seed=request["seed"], stop=tuple(request["stop"] or ()))
        self.decoder.join(seq)
        return seq

    def stream_step(self, states: list[Sequence]) -> list[Any]:
        from stateful_pool import END_OF_STREAM

        wanted = [s for s in states if not s.ready and s.finished is None]
        if wanted:
            self.decoder.step(wanted)
        return [END_OF_STREAM if s.finished is not None and not s.ready else self._chunk(s)
                for s in states]

    def stream_close(self, state: Sequence) -> None:
        self.decoder.leave(state)

    def _prompt_ids(self, request: dict[str, Any]) -> list[int]:
        tok = self.tokenizer
        if request["messages"] is not None:
            if tok.chat_template is None:
                raise InvalidInputError(
                    f"the tokenizer of {self.model.name_or_path} has no chat template: send "
                    "a 'prompt' instead of 'messages'")
            ids = tok.apply_chat_template(request["messages"], add_generation_prompt=True,
                                          tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tok(request["prompt"]).input_ids
        ids = list(ids)
        if not ids:
            raise InvalidInputError("the prompt is empty after tokenization")
        if len(ids) > self.settings.max_prompt_tokens:
            raise InvalidInputError(f"the prompt has {len(ids)} tokens, more than "
                                    f"LM_MAX_PROMPT_TOKENS={self.settings.max_prompt_tokens}")
        return ids

    def _chunk(self, s: Sequence) -> TextChunk:
        """The text of the tokens written since the last chunk; ends the stream when due."""
        new, s.ready = s.ready, []
        eos = self.tokenizer.eos_token_id
        produced = s.generated
        if eos is not None and eos in new:  # the end-of-text token: stop, without it
            cut = produced.index(eos, len(produced) - len(new))
            produced, s.finished = produced[:cut], "stop"
        text = self.tokenizer.decode(produced, skip_special_tokens=True)
        for stop in s.stop:
            at = text.find(stop, max(0, len(s.sent_text) - len(stop) + 1))
            if at >= 0:
                text, s.finished = text[:at], "stop"
        if s.finished is None and len(s.generated) >= s.max_tokens:
            s.finished = "length"
        # Hold back what may still change: a character cut in the middle of its bytes, and
        # the start of what may become a stop string.
        end = len(text)
        if s.finished is None:
            end = len(text.rstrip("\ufffd"))
            for stop in s.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if text[:end].endswith(stop[:k]):
                        end -= k
                        break
        delta = text[len(s.sent_text):max(end, len(s.sent_text))]
        chunk = TextChunk(text=delta, tokens=len(new),
                          finish_reason=s.finished,
                          prompt_tokens=None if s.sent_tokens else len(s.prompt_ids))
        s.sent_text += delta
        s.sent_tokens += len(new)
        return chunk


def load_causal_lm(model_name: str, weights: str) -> tuple[Any, str, str]:
    """The model of ``MODEL_NAME`` with the weights ``MODEL_WEIGHTS`` asks for."""
    settle_offline_mode(weights)
    from transformers import AutoConfig, AutoModelForCausalLM

    def build() -> Any:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_name))

    if weights in ("auto", "pretrained"):
        try:
            return AutoModelForCausalLM.from_pretrained(model_name), "pretrained", model_name
        except Exception as exc:
            if weights == "pretrained":
                raise
            return build(), "random", warn_random(model_name, exc)
    if weights == "random":
        return build(), "random", "random init"
    model = build()
    model.load_state_dict(read_state_dict(weights), strict=True)
    return model, "checkpoint", weights


def make_tiny(directory: str) -> str:
    """Write a tiny random GPT-2 and a byte-level tokenizer with a chat template to
    ``directory`` (a second, offline): a model to serve where no hub is reachable."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog",
                             "hello world, this is a tiny language model",
                             "user: hi\nassistant: hello"] * 8, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer.save_pretrained(directory)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "make-tiny":
        sys.exit("usage: python -m app.examples.causal_lm make-tiny DIRECTORY")
    print(make_tiny(sys.argv[2]))

"""`TuneConfig`: every knob of a soft-prompt tuning run, frozen and JSON round-trippable.

The config travels inside checkpoints (as JSON) so a resumed run can refuse to continue under
different settings, and inside `TuneResult` so a saved prompt says how it was made.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from spt_jax.errors import ConfigError

Init = Literal["vocab", "text", "random"]
Optimizer = Literal["adamw", "adam", "adafactor", "sgd"]
Schedule = Literal["constant", "cosine", "linear"]
Remat = Literal["auto", "dots", "full", "none"]

_CHOICES = {
    "init": ("vocab", "text", "random"),
    "optimizer": ("adamw", "adam", "adafactor", "sgd"),
    "schedule": ("constant", "cosine", "linear"),
    "remat": ("auto", "dots", "full", "none"),
}
# Fields a resumed run may change: they decide how long or how often, not what is learned.
RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "stop_metric",
                               "stop_threshold", "stop_patience"})


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """Soft-prompt tuning settings. Defaults follow the protocol: P=10 vectors, 80 steps at batch 8.

    Attributes:
      prompt_length: P, the number of trainable vectors placed right after BOS.
      init: "vocab" (embeddings of P random vocabulary tokens, as in Lester et al. 2021), "text"
        (embeddings of ``init_text``, repeated or cut to P tokens, as PEFT's TEXT init) or "random"
        (normal noise with the embedding table's standard deviation).
      steps / batch_size: optimizer steps and examples per step (the global batch, over all hosts).
      learning_rate, optimizer, schedule, warmup_steps, weight_decay, max_grad_norm: the optax chain.
      seed: seeds the prompt initializer and the data order.
      max_length: longest sequence in slots, prompt included; longer inputs lose their *left* end.
      length_buckets: allowed padded lengths (each <= max_length); None fits them to the run's own
        batches (`spt_jax.sequence.fit_buckets`: a few exact lengths, so no step pads far past its
        longest row, weighed against one compilation per bucket).
      remat: what each layer recomputes in the backward pass instead of storing: "none" stores every
        intermediate; "dots" stores the weight projections' outputs and recomputes the cheap rest;
        "full" stores only each layer's input (~10x less memory than "none": Gemma-3-270M at 8 x 83
        slots, 1089 -> 162 MiB). "auto" (default) is "dots", or "full" where the step's estimated
        activations pass `spt_jax.tune.step.REMAT_BUDGET_BYTES` (1.5 GiB). True and False mean
        "full" and "none".
      append_eos: train the model to emit EOS after the target, so generation stops by itself.
      eval_every: call the `tune` evaluator every this many steps (0: only at step 0 and at the end).
      stop_metric, stop_threshold, stop_patience: stop before ``steps`` once the evaluator's metric
        ``stop_metric`` (e.g. "format_validity") has reached ``stop_threshold`` and gained nothing
        over the next ``stop_patience`` checks (`spt_jax.tune.stopping`); None never stops early.
        Needs an evaluator and ``eval_every > 0``; the step it saturated at is in the metadata.
      checkpoint_every: save a checkpoint every this many steps (and at the end) when a
        checkpoint directory is given; keep_checkpoints is how many the manager keeps.
    """

    prompt_length: int = 10
    init: Init = "vocab"
    init_text: str | None = None
    steps: int = 80
    batch_size: int = 8
    learning_rate: float = 3e-2
    optimizer: Optimizer = "adamw"
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int = 512
    length_buckets: tuple[int, ...] | None = None
    remat: Remat = "auto"
    append_eos: bool = True
    eval_every: int = 0
    checkpoint_every: int = 20
    keep_checkpoints: int = 3
    stop_metric: str | None = None
    stop_threshold: float = 0.95
    stop_patience: int = 2

    def __post_init__(self):
        if isinstance(self.remat, bool):  # the older switch: on = "full", off = "none"
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                expected = ", ".join(map(repr, choices))
                raise ConfigError(f"TuneConfig.{name}={value!r}; expected one of {expected}")
        positive = ("prompt_length", "steps", "batch_size", "max_length", "keep_checkpoints")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"TuneConfig.{name}={getattr(self, name)!r}; expected an integer >= 1")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"TuneConfig.{name}={getattr(self, name)!r}; expected an integer >= 0")
        if self.stop_metric is not None:
            if not isinstance(self.stop_metric, str) or not self.stop_metric:
                raise ConfigError(f"TuneConfig.stop_metric={self.stop_metric!r}; expected a metric name or None")
            if self.eval_every < 1:
                raise ConfigError("TuneConfig.stop_metric needs eval_every >= 1 (the checks it watches)")
        if not (isinstance(self.stop_patience, int) and self.stop_patience >= 1):
            raise ConfigError(f"TuneConfig.stop_patience={self.stop_patience!r}; expected an integer >= 1")
        if not 0.0 <= self.stop_threshold <= 1.0:
            raise ConfigError(f"TuneConfig.stop_threshold={self.stop_threshold!r}; expected a number in [0, 1]")
        if not self.learning_rate > 0:
            raise ConfigError(f"TuneConfig.learning_rate={self.learning_rate!r}; expected a number > 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"TuneConfig.max_grad_norm={self.max_grad_norm!r}; expected > 0 or None")
        if self.init == "text" and not self.init_text:
            raise ConfigError(
                "TuneConfig.init='text' needs init_text (the text whose embeddings start the prompt)"
            )
        if self.max_length <= self.prompt_length + 2:
            raise ConfigError(
                f"TuneConfig.max_length={self.max_length} leaves no room for text after a "
                f"{self.prompt_length}-vector prompt; expected max_length > prompt_length + 2"
            )
        if self.length_buckets is not None:
            buckets = tuple(self.length_buckets)
            if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
                raise ConfigError(f"TuneConfig.length_buckets={buckets!r}; expected positive integers")
            if max(buckets) > self.max_length:
                raise ConfigError(
                    f"TuneConfig.length_buckets has {max(buckets)} > max_length={self.max_length}"
                )
            object.__setattr__(self, "length_buckets", tuple(sorted(set(buckets))))

    def replace(self, **changes) -> TuneConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        if out["length_buckets"] is not None:
            out["length_buckets"] = list(out["length_buckets"])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TuneConfig:
        """Inverse of `to_dict`; unknown keys raise a ConfigError naming them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            from spt_jax.errors import close_names

            raise ConfigError(
                f"unknown TuneConfig field(s) {', '.join(unknown)}{close_names(unknown[0], fields)}"
            )
        data = dict(data)
        if data.get("length_buckets") is not None:
            data["length_buckets"] = tuple(data["length_buckets"])
        return cls(**data)

    def differences(self, other: TuneConfig) -> list[str]:
        """Names of fields whose values differ (for refusing a resume under other settings)."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

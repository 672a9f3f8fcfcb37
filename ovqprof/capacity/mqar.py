"""Trained multi-query associative recall (MQAR), Zoology's benchmark, for any registered ovqprof layer.

For each layer of a spec and each (seq, pairs) task: build a small language model around the layer, train it
on MQAR data (`mqar_data`) once per learning rate, and report the best test accuracy over learning rates.

Model (Zoology's two-layer recall model without MLPs): token embedding, 2 blocks of
x + mixer(conv(LayerNorm(x))), a final LayerNorm and an output head over the vocabulary, tied to the
embedding as in Zoology's language model (embedding init N(0, 0.02^2)). `conv` is a
depthwise causal convolution of `short_conv` taps; Zoology puts the same kind of short convolution in front
of every mixer (its Hybrid(BaseConv, mixer) blocks) and uses no positional embeddings, and without it a
layer with no positional encoding cannot tell which token follows a key. `short_conv: 0` drops it.

Training: AdamW (weight decay `weight_decay`), linear warmup then cosine decay to 0, gradient norm clipped at
1, cross-entropy on query positions only. Logits are computed at query positions only: the loss and the
accuracy ignore every other position, so this equals Zoology's ignore_index loss at a fraction of the cost
of a vocabulary-sized head over all T positions. Every learning rate starts from the same initial weights
(torch.manual_seed(seed) before building) and sees the same batches (a seeded torch.Generator).

Rows have the capacity columns (`ovqprof.capacity.rows`): seq, pairs, d_model, accuracy and lr (the best
learning rate) are set, dk = dv = the layer's head_dim, seeds is the one seed, keys, gap, cosine, rel_error,
capacity and tau are None. `state_bytes` is the model's decode state after `seq`
tokens at batch 1: the mixer's own `state_bytes(1, seq)` times 2 blocks (the short convolutions' k-1 cached
tokens per block are not counted: they are the same for every layer).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from torch import nn

from ovqprof import registry
from ovqprof.capacity.mqar_data import IGNORE, MQARData, check_task, generate_mqar, train_test_seeds
from ovqprof.capacity.rows import empty_row
from ovqprof.spec import DTYPES, LayerSpec

N_BLOCKS = 2
GRAD_CLIP = 1.0
_HALF = (torch.float16, torch.bfloat16)


# --- settings ------------------------------------------------------------------------------------------------
class MQARTask(BaseModel):
    """One MQAR task: sequences of `seq` tokens holding `pairs` key-value pairs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: StrictInt = Field(ge=4, description="sequence length T: an even integer >= 4")
    pairs: StrictInt = Field(ge=1, description="key-value pairs N: an integer >= 1 with 4 * pairs <= seq")

    @model_validator(mode="after")
    def _fits(self) -> MQARTask:
        if self.seq % 2 or 4 * self.pairs > self.seq:
            raise ValueError(f"task (seq={self.seq}, pairs={self.pairs}) needs an even seq and 4 * pairs <= seq")
        return self


class MQARSettings(BaseModel):
    """What the trained recall benchmark runs. The defaults fit a 2-core CPU (400 steps, a few minutes per layer;
    softmax attention reaches >= 0.95 on seq 256 with 16 pairs at d_model 64)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: StrictInt = Field(
        2048, ge=8, description="vocabulary V (an integer > seq): keys from [1, V/2), values from [V/2, V); "
                                "Zoology uses 8192, which needs several times more steps to learn")
    tasks: tuple[MQARTask, ...] = Field(
        (MQARTask(seq=256, pairs=16),), min_length=1,
        description="a non-empty list of {seq, pairs} (Zoology: 64/4, 128/8, 256/16; Based adds 1024/256)")
    d_model: StrictInt | None = Field(
        64, ge=1, description="model width for every layer (an integer >= 1), or null for each layer's d_model")
    short_conv: StrictInt = Field(3, ge=0, description="taps of the causal depthwise conv before each mixer; 0 = none")
    train_examples: StrictInt = Field(12800, ge=1, description="training examples per task (an integer >= 1)")
    test_examples: StrictInt = Field(256, ge=1, description="test examples per task (an integer >= 1)")
    batch_size: StrictInt = Field(32, ge=1, description="examples per optimizer step (an integer >= 1)")
    epochs: StrictInt = Field(1, ge=1, description="passes over the training set (an integer >= 1)")
    steps: StrictInt | None = Field(
        None, ge=1, description="optimizer steps per learning rate (an integer >= 1); overrides epochs when set")
    lrs: tuple[float, ...] = Field(
        (1e-2,), min_length=1, description="learning rates to try (numbers > 0); the best accuracy is kept")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (a number >= 0)")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="share of steps with linear warmup, in [0, 1)")
    seed: StrictInt = Field(0, ge=0, description="seed of data (train: seed, test: seed + 10) and weights")
    power_a: float = Field(0.01, gt=0, le=1, description="gap law p(g) ~ (g+1)^(a-1), a in (0, 1]; 1 = uniform")
    layers: tuple[str, ...] | None = Field(
        None, min_length=1, description="names of the spec's layers to train (default: all of them); the "
        "command line's --layers wins over this list")

    @model_validator(mode="after")
    def _valid(self) -> MQARSettings:
        if any(lr <= 0 or not math.isfinite(lr) for lr in self.lrs):
            raise ValueError(f"lrs must be finite numbers > 0 (got {list(self.lrs)})")
        for task in self.tasks:
            check_task(task.seq, task.pairs, self.vocab_size)
        return self

    def steps_per_lr(self) -> int:
        return self.steps if self.steps is not None else self.epochs * math.ceil(self.train_examples / self.batch_size)


# --- model ---------------------------------------------------------------------------------------------------
class CausalShortConv(nn.Module):
    """Depthwise causal convolution: y_t = b + sum_{j<taps} w_j * x_{t-j} per channel. x[B, T, D] -> y[B, T, D].

    Written as a sum of shifted copies: for a few taps this is faster on CPU than a grouped nn.Conv1d.
    """

    def __init__(self, d_model: int, taps: int):
        super().__init__()
        self.taps = taps
        bound = 1.0 / math.sqrt(taps)  # nn.Conv1d's default for a depthwise kernel
        self.weight = nn.Parameter(torch.empty(taps, d_model).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(d_model).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.weight[0] + self.bias
        for j in range(1, min(self.taps, x.shape[1])):
            y = y + F.pad(x[:, :-j], (0, 0, j, 0)) * self.weight[j]
        return y


class MQARBlock(nn.Module):
    """x[B, T, D] -> x + mixer(conv(LayerNorm(x)))."""

    def __init__(self, d_model: int, mixer: nn.Module, short_conv: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.conv = CausalShortConv(d_model, short_conv) if short_conv > 0 else nn.Identity()
        self.mixer = mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.conv(self.norm(x)))


class MQARModel(nn.Module):
    """Embedding, blocks, final LayerNorm, head tied to the embedding. inputs[B, T] -> logits[B, T, V], or logits[M, V] at the M
    positions where `where[B, T]` is true."""

    def __init__(self, vocab_size: int, d_model: int, mixers: list[nn.Module], short_conv: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(MQARBlock(d_model, mixer, short_conv) for mixer in mixers)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.head.weight = self.embed.weight  # tied, as Zoology's language model does

    def forward(self, inputs: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(inputs)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x if where is None else x[where])


def build_mixer(layer: LayerSpec, d_model: int) -> nn.Module:
    """The layer of `layer` at width d_model (its own heads, head_dim and options)."""
    layer_type = registry.get_layer_type(layer.type)
    return registry.build_layer(layer_type, d_model, layer.heads, layer.head_dim, dict(layer.options))


def build_model(layer: LayerSpec, settings: MQARSettings, d_model: int) -> MQARModel:
    """The recall model around N_BLOCKS fresh copies of `layer`, in float32 (float64 for float64 layers)."""
    mixers = [build_mixer(layer, d_model) for _ in range(N_BLOCKS)]
    model = MQARModel(settings.vocab_size, d_model, mixers, settings.short_conv)
    return model.to(torch.float64) if layer.dtype == "float64" else model


# --- training ------------------------------------------------------------------------------------------------
def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier at `step` (0-based): linear ramp over `warmup` steps, then cosine from 1 down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` index batches, reshuffling at each pass over the n examples."""
    done = 0
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


def _autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for half-precision layers (float32 master weights); nothing for float32/float64."""
    if dtype in _HALF:
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def loss_and_correct(model: MQARModel, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy over query positions, the number answered correctly and the number of queries."""
    where = targets != IGNORE
    logits = model(inputs, where)
    wanted = targets[where]
    loss = F.cross_entropy(logits.float(), wanted)
    correct = int((logits.argmax(dim=-1) == wanted).sum())
    return loss, correct, int(wanted.numel())


@torch.no_grad()
def evaluate(model: MQARModel, data: MQARData, batch_size: int, device: torch.device, dtype: torch.dtype) -> float:
    """Fraction of query positions of `data` whose argmax prediction is the right value."""
    model.eval()
    correct = total = 0
    for start in range(0, len(data.inputs), batch_size):
        inputs = data.inputs[start:start + batch_size].to(device)
        targets = data.targets[start:start + batch_size].to(device)
        with _autocast(device, dtype):
            _, c, n = loss_and_correct(model, inputs, targets)
        correct, total = correct + c, total + n
    model.train()
    return correct / total


class TrainResult(BaseModel):
    """Outcome of one learning rate: test accuracy, last training loss, and a note if training stopped."""

    model_config = ConfigDict(frozen=True)

    lr: float
    accuracy: float
    final_loss: float
    note: str = ""


def train_one(model: MQARModel, train: MQARData, test: MQARData, settings: MQARSettings, lr: float,
              device: torch.device, dtype: torch.dtype,
              on_step: Callable[[int, float, float], None] | None = None) -> TrainResult:
    """Train `model` in place at learning rate `lr`; `on_step(step, loss, batch_accuracy)` after each step."""
    total = settings.steps_per_lr()
    warmup = round(settings.warmup_fraction * total)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    loss_value = math.nan
    for step, idx in enumerate(_batches(len(train.inputs), settings.batch_size, total, generator)):
        inputs, targets = train.inputs[idx].to(device), train.targets[idx].to(device)
        with _autocast(device, dtype):
            loss, correct, count = loss_and_correct(model, inputs, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            return TrainResult(lr=lr, accuracy=0.0, final_loss=loss_value, note=f"lr {lr:g}: loss not finite at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, loss_value, correct / count)
    accuracy = evaluate(model, test, settings.batch_size, device, dtype)
    return TrainResult(lr=lr, accuracy=accuracy, final_loss=loss_value)


# --- the benchmark -------------------------------------------------------------------------------------------
def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _state_bytes(model: MQARModel, seq: int) -> int | None:
    """Sum of the mixers' state_bytes(1, seq); None when a mixer does not know its state size."""
    total = 0
    for block in model.blocks:
        fn = getattr(block.mixer, "state_bytes", None)
        try:
            value = fn(1, seq) if callable(fn) else None
        except NotImplementedError:
            value = None
        if value is None:
            return None
        total += int(value)
    return total


class _Bar:
    """Training progress on stderr: a rich bar per training run in a terminal; elsewhere (a log file, CI) a
    line at each quarter of a run with its step, loss and batch accuracy; nothing when disabled."""

    LINES_PER_RUN = 4

    def __init__(self, enabled: bool):
        self.progress = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and not self.lines:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.2f}"), TimeElapsedColumn(),
                console=Console(stderr=True))

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def run(self, description: str, total: int) -> Callable[[int, float, float], None] | None:
        if self.lines:
            every = max(1, total // self.LINES_PER_RUN)
            start = time.perf_counter()

            def log_step(step: int, loss: float, acc: float) -> None:
                if (step + 1) % every == 0 or step + 1 == total:
                    sys.stderr.write(f"{description}: step {step + 1}/{total} loss {loss:.3f} acc {acc:.2f} "
                                     f"({time.perf_counter() - start:.0f} s)\n")
                    sys.stderr.flush()

            return log_step
        if self.progress is None:
            return None
        task = self.progress.add_task(description, total=total, loss=math.nan, acc=0.0)

        def on_step(step: int, loss: float, acc: float) -> None:
            self.progress.update(task, completed=step + 1, loss=loss, acc=acc)

        return on_step


def run_layer_task(layer: LayerSpec, task: MQARTask, settings: MQARSettings, device: torch.device,
                   train: MQARData, test: MQARData, bar: _Bar) -> dict:
    """Train and test one layer on one task over every learning rate; the result row (never raises for a
    layer's failure: the row says error or oom)."""
    d_model = settings.d_model if settings.d_model is not None else layer.d_model
    row = empty_row(method="mqar", layer=layer.name, type=layer.type, dtype=layer.dtype, device=str(device),
                    d_model=d_model, seq=task.seq, pairs=task.pairs, dk=layer.head_dim, dv=layer.head_dim,
                    seeds=str(settings.seed), status="ok", note="")
    start = time.perf_counter()
    dtype = DTYPES[layer.dtype]
    results: list[TrainResult] = []
    try:
        row["kind"] = registry.get_layer_type(layer.type).kind
        for lr in settings.lrs:
            torch.manual_seed(settings.seed)  # the same initial weights for every learning rate
            model = build_model(layer, settings, d_model).to(device)
            if row["state_bytes"] is None:
                row["state_bytes"] = _state_bytes(model, task.seq)
            label = f"{layer.name} seq {task.seq} pairs {task.pairs} lr {lr:g}"
            results.append(train_one(model, train, test, settings, lr, device, dtype,
                                     bar.run(label, settings.steps_per_lr())))
            del model
    except Exception as exc:  # a layer that cannot build or train is a result row, not the end of the run
        row["status"] = "oom" if _is_oom(exc) else "error"
        row["note"] = _message(exc)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if results:
        best = max(results, key=lambda r: r.accuracy)  # first of equals: the smaller lr when listed first
        row["accuracy"], row["lr"] = best.accuracy, best.lr
        notes = [r.note for r in results if r.note]
        row["note"] = "; ".join(([row["note"]] if row["note"] else []) + notes)
    row["note"] = row["note"] or None
    row["wall_s"] = time.perf_counter() - start
    return row


def run_mqar(layers: list[LayerSpec], settings: MQARSettings, device: torch.device,
             on_row: Callable[[dict], None], show_progress: bool, skip: frozenset = frozenset()) -> None:
    """Run every (layer, task) and call `on_row` with one row each (ROW_COLUMNS, in order), except the
    (layer name, seq, pairs) in `skip` (already in a resumed file).

    Data for a task is generated once (train seed `seed`, test seed `seed + 10`) and shared by all layers.
    """
    data: dict[MQARTask, tuple[MQARData, MQARData]] = {}
    train_seed, test_seed = train_test_seeds(settings.seed)
    with _Bar(show_progress) as bar:
        for layer in layers:
            for task in settings.tasks:
                if (layer.name, task.seq, task.pairs) in skip:
                    continue
                if task not in data:
                    common = dict(seq=task.seq, pairs=task.pairs, vocab_size=settings.vocab_size,
                                  power_a=settings.power_a)
                    data[task] = (generate_mqar(settings.train_examples, seed=train_seed, **common),
                                  generate_mqar(settings.test_examples, seed=test_seed, **common))
                on_row(run_layer_task(layer, task, settings, device, *data[task], bar))

"""MQAR (trained recall): Zoology's data generator, the recall model, deterministic training, result rows."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import yaml

from ovqprof.capacity.mqar import (
    N_BLOCKS,
    MQARModel,
    MQARSettings,
    MQARTask,
    build_mixer,
    build_model,
    cosine_with_warmup,
    run_mqar,
    train_one,
)
from ovqprof.capacity.mqar_data import IGNORE, gap_probabilities, generate_mqar, train_test_seeds
from ovqprof.capacity.rows import COLUMNS as ROW_COLUMNS
from ovqprof.spec import LayerSpec

ROOT = Path(__file__).resolve().parents[1]
V, T, N = 512, 64, 8


def softmax_layer(**changes) -> LayerSpec:
    fields = dict(name="mha", type="softmax_attention", d_model=32, heads=2, head_dim=16, dtype="float32")
    return LayerSpec(**{**fields, **changes})


def tiny_settings(**changes) -> MQARSettings:
    """An easy task that a softmax model learns in seconds on one CPU core."""
    fields = dict(vocab_size=64, tasks=[{"seq": 32, "pairs": 4}], d_model=32, train_examples=1024,
                  test_examples=128, batch_size=32, steps=200, lrs=[3e-2], seed=0)
    return MQARSettings(**{**fields, **changes})


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


@pytest.fixture(scope="module")
def data():
    return generate_mqar(400, T, N, V, power_a=0.01, seed=3)


# --- data ----------------------------------------------------------------------------------------------------
def test_keys_and_values_distinct_and_in_their_halves(data):
    keys, values = data.inputs[:, 0:2 * N:2], data.inputs[:, 1:2 * N:2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((values >= V // 2) & (values < V)).all()
    for row in range(len(keys)):
        assert len(set(keys[row].tolist())) == N
        assert len(set(values[row].tolist())) == N
    assert (data.targets[:, :2 * N] == IGNORE).all()  # nothing is asked inside the context


def test_every_key_queried_once_with_its_value_as_target(data):
    for row in range(len(data.inputs)):
        inputs, targets = data.inputs[row], data.targets[row]
        pairs = dict(zip(inputs[0:2 * N:2].tolist(), inputs[1:2 * N:2].tolist(), strict=True))
        asked = (targets != IGNORE).nonzero().flatten()
        assert len(asked) == N
        assert sorted(inputs[asked].tolist()) == sorted(pairs)  # each key exactly once
        for pos in asked.tolist():
            assert targets[pos].item() == pairs[inputs[pos].item()]
            assert pos >= 2 * N and (pos - 2 * N) % 2 == 0  # Zoology's even query slots


def test_non_query_positions_ignored_and_filler_random(data):
    asked = data.targets != IGNORE
    assert (data.targets[~asked] == IGNORE).all()
    region = torch.zeros_like(asked)
    region[:, 2 * N:] = True
    filler = region & ~asked
    tokens = data.inputs[filler]
    # random tokens over the whole vocabulary, not a constant pad token
    assert tokens.min() >= 0 and tokens.max() < V
    assert len(set(tokens.tolist())) > V // 2
    assert (tokens >= V // 2).float().mean() == pytest.approx(0.5, abs=0.05)


def test_gap_law_favours_short_gaps(data):
    p = gap_probabilities(20, 0.01)
    assert p.sum() == pytest.approx(1.0)
    assert (np.diff(p) < 0).all()
    assert p[0] / p[1] == pytest.approx(2 ** 0.99)
    assert gap_probabilities(20, 1.0) == pytest.approx(np.full(20, 0.05))
    space = (T - 2 * N) // 2
    gaps = ((data.targets != IGNORE).nonzero()[:, 1] - 2 * N) // 2
    assert gaps.min() >= 0 and gaps.max() < space
    uniform = generate_mqar(400, T, N, V, power_a=1.0, seed=3)
    gaps_uniform = ((uniform.targets != IGNORE).nonzero()[:, 1] - 2 * N) // 2
    # drawn without replacement N of 24 slots: short gaps clearly over-represented, uniform about even
    assert (gaps < space // 2).float().mean() > 0.6
    assert (gaps_uniform < space // 2).float().mean() == pytest.approx(0.5, abs=0.05)


def test_same_seed_same_data_other_seed_other_data():
    a = generate_mqar(50, T, N, V, 0.01, seed=1)
    b = generate_mqar(50, T, N, V, 0.01, seed=1)
    c = generate_mqar(50, T, N, V, 0.01, seed=2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    train_seed, test_seed = train_test_seeds(0)
    assert train_seed != test_seed


@pytest.mark.parametrize("seq, pairs, vocab", [(63, 4, 512), (64, 17, 512), (64, 4, 64), (64, 0, 512)])
def test_impossible_tasks_rejected(seq, pairs, vocab):
    with pytest.raises(ValueError):
        generate_mqar(2, seq, pairs, vocab, 0.01, seed=0)


def test_settings_validate():
    with pytest.raises(pydantic.ValidationError, match="4 \\* pairs"):
        MQARSettings(tasks=[{"seq": 64, "pairs": 17}])
    with pytest.raises(pydantic.ValidationError, match="extra"):
        MQARSettings(epoch=3)
    with pytest.raises(pydantic.ValidationError):
        MQARSettings(lrs=[0.0])
    with pytest.raises(pydantic.ValidationError, match="vocab_size"):
        MQARSettings(vocab_size=64, tasks=[{"seq": 128, "pairs": 8}])
    settings = MQARSettings(train_examples=100, batch_size=32, epochs=2)
    assert settings.steps_per_lr() == 8
    assert MQARSettings(steps=5).steps_per_lr() == 5
    with pytest.raises(pydantic.ValidationError):
        settings.seed = 1  # frozen


# --- model and schedule --------------------------------------------------------------------------------------
def test_model_shapes_tied_head_and_causal():
    torch.manual_seed(0)
    settings = tiny_settings()
    model = build_model(softmax_layer(), settings, 32)
    assert len(model.blocks) == N_BLOCKS and isinstance(model, MQARModel)
    assert model.head.weight is model.embed.weight
    inputs = torch.randint(0, 64, (3, 32))
    logits = model(inputs)
    assert logits.shape == (3, 32, 64)
    where = torch.zeros(3, 32, dtype=torch.bool)
    where[0, 5] = where[2, 30] = True
    picked = model(inputs, where)
    assert picked.shape == (2, 64)
    torch.testing.assert_close(picked, logits[where])
    changed = inputs.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 64
    after = model(changed)
    torch.testing.assert_close(after[:, :20], logits[:, :20])  # the future never leaks back
    assert not torch.allclose(after[:, 20:], logits[:, 20:])


def test_short_conv_off_and_d_model_override():
    layer = softmax_layer(d_model=256)
    model = build_model(layer, tiny_settings(short_conv=0), 48)
    assert isinstance(model.blocks[0].conv, torch.nn.Identity)
    assert model.embed.weight.shape == (64, 48)
    assert build_mixer(layer, 48).d_model == 48


def test_cosine_schedule_with_warmup():
    values = [cosine_with_warmup(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5)
    assert values[-1] < 0.001
    assert all(values[i] >= values[i + 1] for i in range(9, 99))


# --- training ------------------------------------------------------------------------------------------------
def _train(settings: MQARSettings, layer: LayerSpec):
    task = settings.tasks[0]
    train = generate_mqar(settings.train_examples, task.seq, task.pairs, settings.vocab_size, 0.01, seed=0)
    test = generate_mqar(settings.test_examples, task.seq, task.pairs, settings.vocab_size, 0.01, seed=10)
    torch.manual_seed(settings.seed)
    model = build_model(layer, settings, settings.d_model)
    losses = []
    result = train_one(model, train, test, settings, settings.lrs[0], torch.device("cpu"), torch.float32,
                       on_step=lambda step, loss, acc: losses.append(loss))
    return result, losses


def test_training_is_deterministic_given_the_seed():
    settings = tiny_settings(steps=12, train_examples=256, test_examples=64)
    first, losses_a = _train(settings, softmax_layer())
    second, losses_b = _train(settings, softmax_layer())
    assert len(losses_a) == 12
    assert losses_a == losses_b
    assert first.accuracy == second.accuracy and first.final_loss == second.final_loss
    other, _ = _train(settings.model_copy(update={"seed": 1}), softmax_layer())
    assert other.final_loss != first.final_loss  # the seed does reach the weights and batches


def test_softmax_learns_an_easy_task():
    settings = tiny_settings()
    result, losses = _train(settings, softmax_layer())
    # chance: 1/32 over the value half of the vocabulary, 1/4 for a guess among the example's own values
    assert result.accuracy > 0.6, result
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


# --- rows ----------------------------------------------------------------------------------------------------
def test_rows_columns_state_bytes_and_failures_keep_going():
    settings = tiny_settings(steps=3, train_examples=64, test_examples=32,
                             tasks=[{"seq": 32, "pairs": 4}, {"seq": 16, "pairs": 2}])
    layers = [
        softmax_layer(name="bad_heads", options={"kv_heads": 3}),  # cannot build: 3 does not divide 2
        LayerSpec(name="toy_error", type="failing_layers:ToyLayer", d_model=32, heads=1, head_dim=32,
                  dtype="float32", options={"fail": "error"}),
        LayerSpec(name="toy_oom", type="failing_layers:ToyLayer", d_model=32, heads=1, head_dim=32,
                  dtype="float32", options={"fail": "oom"}),
        softmax_layer(),
    ]
    rows: list[dict] = []
    run_mqar(layers, settings, torch.device("cpu"), rows.append, show_progress=False)
    assert [(r["layer"], r["seq"]) for r in rows] == [
        (name, seq) for name in ("bad_heads", "toy_error", "toy_oom", "mha") for seq in (32, 16)]
    for row in rows:
        assert tuple(row) == ROW_COLUMNS
        assert row["method"] == "mqar" and row["wall_s"] >= 0
    bad, err, oom, ok = rows[0], rows[2], rows[4], rows[6]
    assert bad["status"] == "error" and "kv_heads" in bad["note"] and bad["accuracy"] is None
    assert err["status"] == "error" and "deliberate failure" in err["note"]
    assert oom["status"] == "oom"
    assert ok["status"] == "ok" and ok["note"] is None
    assert 0.0 <= ok["accuracy"] <= 1.0 and ok["lr"] == 3e-2
    assert (ok["kind"], ok["type"], ok["d_model"], ok["pairs"], ok["dk"]) == ("softmax", "softmax_attention", 32, 4, 16)
    assert all(ok[c] is None for c in ("keys", "gap", "cosine", "rel_error", "capacity", "tau"))
    mixer = build_mixer(softmax_layer(), 32)
    assert ok["state_bytes"] == N_BLOCKS * mixer.state_bytes(1, 32)
    assert rows[7]["state_bytes"] == N_BLOCKS * mixer.state_bytes(1, 16)


def test_best_learning_rate_is_reported(monkeypatch):
    import ovqprof.capacity.mqar as mqar

    accuracy_at = {1e-3: 0.4, 3e-3: 0.9, 1e-2: 0.7}
    monkeypatch.setattr(mqar, "train_one", lambda model, train, test, settings, lr, *args: mqar.TrainResult(
        lr=lr, accuracy=accuracy_at[lr], final_loss=1.0, note="diverged" if lr == 1e-2 else ""))
    rows: list[dict] = []
    settings = tiny_settings(steps=1, lrs=list(accuracy_at), train_examples=32, test_examples=32)
    run_mqar([softmax_layer()], settings, torch.device("cpu"), rows.append, show_progress=False)
    assert (rows[0]["lr"], rows[0]["accuracy"], rows[0]["note"]) == (3e-3, 0.9, "diverged")


# --- profiles ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["capacity-quick.yaml", "capacity.yaml"])
def test_profile_mqar_section_is_valid(name):
    path = ROOT / "profiles" / name
    if not path.exists():
        pytest.skip(f"{name} not written yet")
    section = yaml.safe_load(path.read_text())["capacity"]["mqar"]
    settings = MQARSettings(**section)
    assert MQARTask(seq=256, pairs=16) in settings.tasks


@pytest.mark.slow
def test_softmax_reaches_95_percent_on_256_16_at_d_model_64():
    """The capacity-quick settings: softmax attention must recall (seq 256, 16 pairs) at d_model 64."""
    section = yaml.safe_load((ROOT / "profiles" / "capacity-quick.yaml").read_text())["capacity"]["mqar"]
    settings = MQARSettings(**{**section, "tasks": [{"seq": 256, "pairs": 16}], "d_model": 64})
    layer = softmax_layer(d_model=64, heads=2, head_dim=64)  # the profile's softmax layer
    rows: list[dict] = []
    run_mqar([layer], settings, torch.device("cpu"), rows.append, show_progress=False)
    assert rows[0]["status"] == "ok", rows[0]
    assert rows[0]["accuracy"] >= 0.95, rows[0]
    assert math.isfinite(rows[0]["wall_s"])


# --- CLI -----------------------------------------------------------------------------------------------------
TINY_MQAR_SPEC = """\
defaults: {d_model: 16, heads: 1, head_dim: 16}
layers:
  - {name: mha, type: softmax_attention}
  - {name: lin, type: linear_attention, feature_map: identity, normalize: false}
capacity:
  mqar:
    vocab_size: 64
    tasks: [{seq: 16, pairs: 2}, {seq: 32, pairs: 4}]
    d_model: 16
    train_examples: 64
    test_examples: 16
    batch_size: 16
    steps: 2
    lrs: [0.001]
"""


def test_cli_mqar_rows_in_csv(tmp_path):
    from typer.testing import CliRunner

    from ovqprof.cli import app

    spec = tmp_path / "mqar.yaml"
    spec.write_text(TINY_MQAR_SPEC)
    result = CliRunner().invoke(app, ["capacity", "--method", "mqar", "-p", str(spec), "-f", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == list(ROW_COLUMNS)
    assert [(r["layer"], r["seq"], r["pairs"]) for r in rows] == [
        ("mha", "16", "2"), ("mha", "32", "4"), ("lin", "16", "2"), ("lin", "32", "4")]
    assert {(r["method"], r["status"], r["d_model"], r["lr"], r["seeds"]) for r in rows} == {
        ("mqar", "ok", "16", "0.001", "0")}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and int(r["state_bytes"]) > 0 for r in rows)


def test_cli_mqar_bad_setting_names_its_line(tmp_path):
    from typer.testing import CliRunner

    from ovqprof.cli import app

    spec = tmp_path / "mqar.yaml"
    spec.write_text(TINY_MQAR_SPEC.replace("    steps: 2\n", "    stepz: 2\n"))
    result = CliRunner().invoke(app, ["capacity", "--method", "mqar", "-p", str(spec)])
    assert result.exit_code == 2
    assert "line 13" in result.output and "stepz" in result.output

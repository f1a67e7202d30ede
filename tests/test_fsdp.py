"""Sharded training (``--strategy fsdp``, FSDP2): real processes started by
torchrun, gloo on the CPU.

The slow tests share a few real runs of one job: 3 epochs with DDP and with
FSDP in 2 processes, and resumes of the FSDP run's epoch-2 checkpoint in 2
processes and in 1.  The job's validation split (33 samples in batches of 8)
gives the two ranks parts of 17 and 16: 3 and 2 batches as DDP cuts them, so
an FSDP evaluation that did not keep the ranks in step would hang (and fail
on the timeout).
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import warnings
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing import event_accumulator
from torch import nn

from trainer_core.checkpointing import load_checkpoint, newest_checkpoint, remove_checkpoint
from trainer_core.cli import make_cli
from trainer_core.data import Batches, TensorSplit
from trainer_core.errors import UsageError
from trainer_core.fsdp import FSDP, shard_units
from trainer_core.sharded import (drop_stale_shards, own_digests, read_model_shards, read_shards, resolve_shards, shards_root,
                                  unseen_shards, write_shards)
from trainer_core.testing import run_tiny, write_fake_distribution

# Saves every rank's whole weights at the end (gathered from the shards under FSDP).
PROBE = '''
from pathlib import Path

from trainer_core import hookimpl
from trainer_core.distributed import rank_zero_only


class Weights:
    def __init__(self, out: str = "") -> None:
        self.out = Path(out)

    @hookimpl
    def on_fit_end(self, trainer):
        import torch

        weights = {k: v.detach().cpu() for k, v in trainer.model_weights().items()}
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": weights, "strategy": trainer.strategy.name}, self.out / f"rank{trainer.rank}.pt")


@rank_zero_only
class ZeroReads:
    """On rank zero alone, after the run (as a tracker uploads the model): the last checkpoint's whole weights."""

    def __init__(self, out: str = "") -> None:
        self.out = Path(out)

    @hookimpl
    def on_run_end(self, trainer):
        import torch
        from trainer_core.checkpointing import checkpoint_weights, load_checkpoint

        weights = checkpoint_weights(load_checkpoint(trainer.run_path / "checkpoints" / "last.pt"), trainer.model)
        torch.save(dict(weights), self.out)
'''

JOB = [
    "--dataset", "fake", "-o", "dataset.train_size=91", "-o", "dataset.val_size=33", "-o", "dataset.num_classes=4",
    "-o", "dataset.noise=2.0", "-o", "model.width=4", "-o", "model.dropout=0", "--batch-size", "8",
    "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--log-every", "4", "--seed", "3", "--quiet",
    "--plugins", "checkpoint", "-o", "checkpoint.restore_best=false", "-o", "checkpoint.monitor=val/loss",
    "-o", "checkpoint.save_top_k=-1",
    # Frozen features join training at epoch 3: a sharded parameter's requires_grad changes mid-run.
    "--plugins", "freeze", "-o", "freeze.freeze=features", "-o", "freeze.unfreeze_at_epoch=3",
    "--plugins", "tensorboard", "-o", "tensorboard.histogram_every_n_steps=12",
]
# DDP and FSDP reduce the same gradients in another order (all-reduce vs reduce-scatter):
# float32 rounding, amplified over 36 SGD steps with momentum, stays far below this.
RTOL = 1e-4
TIMEOUT = 300


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = write_fake_distribution(tmp_path_factory.mktemp("site"), "fsdp-probe",
                                     {"trainer.plugins": {"weights-probe": "fsdp_probe:Weights", "zero-reads": "fsdp_probe:ZeroReads"}},
                                     modules={"fsdp_probe": PROBE})
    yield folder


def launch(site: Path, nproc: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("TRAINER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "trainer_core", "run", "--nproc-per-node", str(nproc), *args],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)


def probe(out: Path) -> list[str]:
    return ["--plugins", "weights-probe", "-o", f"weights-probe.out={out}"]


@pytest.fixture(scope="module")
def runs(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for name, strategy in (("ddp", "ddp"), ("fsdp", "fsdp")):
        done = launch(site, 2, [*JOB, "--strategy", strategy, "--epochs", "3", "--run-dir", str(root / name),
                                *probe(root / f"{name}-probe"), "--plugins", "zero-reads", "-o",
                                f"zero-reads.out={root / f'{name}-zero-reads.pt'}"])
        assert done.returncode == 0, done.stderr
        (root / f"{name}.stderr").write_text(done.stderr)
    epoch2 = epoch_checkpoint(root / "fsdp", 2)
    for name, nproc in (("fsdp-resumed-2", 2), ("fsdp-resumed-1", 1)):
        done = launch(site, nproc, [*JOB, "--strategy", "fsdp", "--epochs", "3", "--resume", str(epoch2),
                                    "--run-dir", str(root / name), *probe(root / f"{name}-probe"), "--plugins", "no:zero-reads"])
        assert done.returncode == 0, done.stderr
    return root


def epoch_checkpoint(run: Path, epoch: int) -> Path:
    [found] = (run / "checkpoints").glob(f"best-epoch{epoch:03d}-*.pt")
    return found


def history(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(runs: Path, name: str, rank: int = 0) -> dict[str, Any]:
    return torch.load(runs / f"{name}-probe" / f"rank{rank}.pt", weights_only=True)


def assert_close_metrics(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert [m.keys() for m in a] == [m.keys() for m in b]
    for x, y in zip(a, b):
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=RTOL, abs=RTOL), key


# -- real runs -----------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_trains_the_same_model_as_ddp(runs: Path) -> None:
    assert_close_metrics(history(runs / "fsdp"), history(runs / "ddp"))
    fsdp, ddp = weights(runs, "fsdp"), weights(runs, "ddp")
    assert (fsdp["strategy"], ddp["strategy"]) == ("fsdp", "ddp")
    assert fsdp["weights"].keys() == ddp["weights"].keys()
    for key, value in fsdp["weights"].items():
        torch.testing.assert_close(value, ddp["weights"][key], rtol=RTOL, atol=RTOL, msg=lambda m: f"{key}: {m}")
    # Every rank gathered the same whole weights from the shards.
    for key, value in weights(runs, "fsdp", 1)["weights"].items():
        assert torch.equal(value, fsdp["weights"][key]), key


@pytest.mark.slow
def test_each_rank_writes_its_shards_beside_a_checkpoint_that_holds_no_weights(runs: Path) -> None:
    last = runs / "fsdp" / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    assert payload["model"] is None and payload["optimizer"] is None
    folder = payload["shards"]
    assert folder.parent == shards_root(last)
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # One shards folder per checkpoint: the replaced ones were removed.
    assert [p.name for p in shards_root(last).iterdir()] == [folder.name]
    assert len(list((runs / "fsdp" / "checkpoints").glob("*.pt.shards"))) == 4  # last.pt and 3 best


@pytest.mark.slow
def test_rank_zero_alone_reads_a_sharded_checkpoint_during_the_run(runs: Path) -> None:
    # A rank-zero-only plugin (a tracker uploading the model) reads the shards while the process group is up.
    assert "zero-reads" not in (runs / "fsdp.stderr").read_text()  # (a failure there is only a warning)
    read = torch.load(runs / "fsdp-zero-reads.pt", weights_only=True)
    final = weights(runs, "fsdp")["weights"]
    assert read.keys() == final.keys()
    for key, value in final.items():
        assert not read[key].is_meta and torch.equal(read[key], value), key


@pytest.mark.slow
def test_a_resume_in_as_many_processes_continues_exactly(runs: Path) -> None:
    assert history(runs / "fsdp-resumed-2") == history(runs / "fsdp")[2:]  # (a new run folder: epoch 3 alone)
    resumed, straight = weights(runs, "fsdp-resumed-2")["weights"], weights(runs, "fsdp")["weights"]
    for key, value in resumed.items():
        assert torch.equal(value, straight[key]), key


@pytest.mark.slow
def test_a_resume_in_another_number_of_processes_reshards(runs: Path) -> None:
    assert_close_metrics(history(runs / "fsdp-resumed-1"), history(runs / "fsdp")[2:])
    resumed, straight = weights(runs, "fsdp-resumed-1")["weights"], weights(runs, "fsdp")["weights"]
    for key, value in resumed.items():
        torch.testing.assert_close(value, straight[key], rtol=RTOL, atol=RTOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
def test_eval_predict_and_export_read_a_sharded_checkpoint_in_one_process(runs: Path, tmp_path: Path) -> None:
    cli = make_cli()
    checkpoint = epoch_checkpoint(runs / "fsdp", 3)
    done = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoint), "--json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    metrics = json.loads(done.output)["metrics"]
    final = history(runs / "fsdp")[-1]
    assert metrics["val/loss"] == pytest.approx(final["val/loss"], rel=1e-6)
    assert metrics["val/acc"] == final["val/acc"]
    out = tmp_path / "model.pt2"
    done = CliRunner().invoke(cli, ["export", "--checkpoint", str(checkpoint), "--format", "exported-program",
                                    "--output", str(out)], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    program = torch.export.load(str(out)).module()
    model_weights = weights(runs, "fsdp")["weights"]
    exported = dict(program.state_dict())
    for key, value in model_weights.items():
        assert torch.equal(exported[f"model.{key}"], value), key  # (behind the export's normalisation)


@pytest.mark.slow
def test_tensorboard_logs_the_graph_where_it_can_and_warns_only_when_asked_for_one(runs: Path, tmp_path: Path, site: Path) -> None:
    assert event_accumulator.EventAccumulator(str(runs / "ddp")).Reload().Graph() is not None
    assert "no model graph" not in (runs / "fsdp.stderr").read_text()  # the default: no graph, and no word of it
    done = launch(site, 2, [*JOB, "--strategy", "fsdp", "--epochs", "1", "--run-dir", str(tmp_path / "run"),
                            "-o", "tensorboard.graph=true"])
    assert done.returncode == 0, done.stderr
    assert "tensorboard: no model graph under --strategy fsdp" in done.stderr


@pytest.mark.slow
def test_tensorboard_histograms_show_whole_parameters_under_fsdp(runs: Path) -> None:
    def histograms(run: Path) -> dict[str, Any]:
        reader = event_accumulator.EventAccumulator(str(run), size_guidance={"histograms": 0})
        reader.Reload()
        return {tag: reader.Histograms(tag) for tag in reader.Tags()["histograms"]}

    fsdp, ddp = histograms(runs / "fsdp"), histograms(runs / "ddp")
    assert fsdp.keys() == ddp.keys() and any(tag.startswith("weights/") for tag in fsdp)
    assert any(tag.startswith("grads/") for tag in fsdp)
    for tag, events in fsdp.items():
        assert [e.step for e in events] == [e.step for e in ddp[tag]], tag
        for mine, theirs in zip(events, ddp[tag]):
            assert mine.histogram_value.num == theirs.histogram_value.num, tag  # whole tensors, not rank 0's shard
            assert mine.histogram_value.sum == pytest.approx(theirs.histogram_value.sum, rel=1e-3, abs=1e-4), tag


# A language model under bf16: its own blocks (shard_blocks), a head tied to the embedding (left
# to the root), FSDP's mixed-precision policy, gradient accumulation (one reduction per step) and clipping.
GPT = ["--model", "tiny-gpt", "--dataset", "pydoc-chars", "-o", "dataset.chars=20000", "-o", "dataset.block_size=32",
       "-o", "model.width=32", "-o", "model.depth=2", "-o", "model.heads=2", "--precision", "bf16", "--epochs", "1",
       "--batch-size", "16", "--accumulate-grad-batches", "2", "--clip-grad-norm", "1.0", "--log-every", "8", "-q"]


@pytest.mark.slow
def test_a_tied_bf16_language_model_trains_under_fsdp_as_under_ddp(site: Path, tmp_path: Path) -> None:
    for strategy in ("ddp", "fsdp"):
        done = launch(site, 2, [*GPT, "--strategy", strategy, "--run-dir", str(tmp_path / strategy)])
        assert done.returncode == 0, done.stderr
    # Both multiply in bf16, but FSDP also keeps the embeddings' and norms' gathered weights in
    # bf16 where autocast leaves them fp32: the runs agree to bf16's precision (measured 2e-4
    # relative on val/loss), far closer than runs that do not learn alike.
    fsdp, ddp = history(tmp_path / "fsdp"), history(tmp_path / "ddp")
    for key in ("train/loss", "val/loss", "val/bits_per_token"):
        assert fsdp[-1][key] == pytest.approx(ddp[-1][key], rel=2e-3), key


def flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_shard_is_refused_and_resume_auto_passes_over_it(runs: Path, tmp_path: Path) -> None:
    run = tmp_path / "fsdp"
    shutil.copytree(runs / "fsdp", run)
    last = run / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    assert sorted(payload["shard_digests"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # every rank's, and DCP's index
    flip_a_byte(shards_root(last) / payload["shards"] / "__1_0.distcp")
    message = r"__1_0.distcp is damaged: its SHA-256 differs from the one recorded when it was saved"
    with pytest.raises(UsageError, match=message):
        load_checkpoint(last)
    result = CliRunner().invoke(make_cli(), ["eval", "--checkpoint", str(last)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert newest_checkpoint(run) not in (None, last)  # --resume auto takes the newest good one


@pytest.mark.slow
def test_a_sharded_checkpoint_is_refused_by_a_run_that_keeps_whole_weights(runs: Path, tmp_path: Path) -> None:
    done = CliRunner().invoke(make_cli(), ["run", *JOB, "--epochs", "4", "--strategy", "auto", "--plugins", "no:weights-probe,no:zero-reads", "--resume",
                                           str(epoch_checkpoint(runs / "fsdp", 2)), "--run-dir", str(tmp_path / "r")])
    assert done.exit_code == 2
    assert "holds sharded weights" in done.output and "--strategy fsdp" in done.output
    assert not (tmp_path / "r").exists()


# -- the parts -----------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.norm = nn.LayerNorm(4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_each_child_is_a_unit_but_tied_children_stay_with_the_root() -> None:
    model = Tied()
    assert shard_units(model) == [*model.blocks, model.norm]  # members of a ModuleList; no parameterless ReLU


def test_a_model_names_its_own_blocks() -> None:
    model = Tied()
    model.shard_blocks = [model.blocks[0]]  # type: ignore[assignment]
    assert shard_units(model) == [model.blocks[0]]
    from trainer_core_plugins.models.tiny_gpt import build

    gpt = build(input_shape=(16,), num_classes=12, width=16, depth=2, heads=2)
    assert shard_units(gpt) == list(gpt.blocks)


@pytest.mark.parametrize("size", [1, 7, 17, 33, 64])
@pytest.mark.parametrize("loader", [False, True], ids=["tensors", "dataloader"])
def test_equal_steps_give_every_rank_as_many_evaluation_batches(size: int, loader: bool) -> None:
    inputs, targets = torch.zeros(size, 1), torch.arange(size)
    split = torch.utils.data.TensorDataset(inputs, targets) if loader else TensorSplit(inputs, targets)
    for world in (1, 2, 3):
        if size < world:
            with pytest.raises(UsageError, match="too small to give each of"):
                Batches(split, 8, torch.device("cpu"), shuffle=False, num_workers=0, rank=0, world_size=world,
                        input_dims=1, equal_steps=True)
            continue
        parts = [Batches(split, 8, torch.device("cpu"), shuffle=False, num_workers=0, rank=r, world_size=world,
                         input_dims=1, equal_steps=True) for r in range(world)]
        batches = [[t.tolist() for _, t in part.iterate()] for part in parts]
        assert len({len(b) for b in batches}) == 1 and {len(p) for p in parts} == {len(batches[0])}
        assert all(0 < len(batch) <= 8 for b in batches for batch in b)
        assert [i for b in batches for batch in b for i in batch] == list(range(size))


def test_shards_named_by_a_checkpoint_must_be_a_folder_of_ours(tmp_path: Path) -> None:
    checkpoint = tmp_path / "last.pt"
    outside = tmp_path / "elsewhere"
    (outside / "0123456789abcdef").mkdir(parents=True)
    (outside / "0123456789abcdef" / ".metadata").write_bytes(b"x")
    for token in ("../elsewhere/0123456789abcdef", str(outside / "0123456789abcdef"), "0123456789ABCDEF", 7, ""):
        with pytest.raises(UsageError, match="not a shards folder this trainer writes"):
            resolve_shards(checkpoint, token)
    with pytest.raises(UsageError, match="is incomplete"):
        resolve_shards(checkpoint, "0123456789abcdef")  # no such folder beside it
    (shards_root(checkpoint) / "fedcba9876543210").mkdir(parents=True)  # a save that never finished
    with pytest.raises(UsageError, match="is incomplete"):
        resolve_shards(checkpoint, "fedcba9876543210")


class Trap:
    """Unpickled with plain pickle, it creates the file ``path``: the mark of code a file chose to run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def saved_shards(tmp_path: Path) -> Path:
    """A real DCP shards folder (one process) of a weight and an optimizer setting (a non-tensor entry)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        write_shards(tmp_path / "last.pt", "0123456789abcdef", {"model": {"w": torch.arange(4.0)},
                                                                 "optim": {"param_groups": [{"lr": 0.25}]}})
    return shards_root(tmp_path / "last.pt") / "0123456789abcdef"


def wanted() -> dict[str, Any]:
    return {"model": {"w": torch.zeros(4)}, "optim": {"param_groups": [{"lr": 0.0}]}}


def rewrite_metadata(folder: Path, change: Any) -> None:
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # (the test's own file)
    change(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def test_shards_read_back_as_written(tmp_path: Path) -> None:
    state = wanted()
    read_shards(saved_shards(tmp_path), state)
    assert torch.equal(state["model"]["w"], torch.arange(4.0)) and state["optim"]["param_groups"] == [{"lr": 0.25}]


def test_shards_metadata_that_names_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    folder = saved_shards(tmp_path)
    mark = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(Trap(mark)))
    for read in (lambda: read_shards(folder, wanted()), lambda: read_model_shards(folder, {"w": torch.zeros(4)})):
        with pytest.raises(UsageError, match=r"is not DCP metadata this trainer reads: it names [\w.]*open,"):
            read()
    assert not mark.exists()


def test_shards_metadata_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    folder = saved_shards(tmp_path)
    (tmp_path / "__0_0.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())  # a readable file out there

    def point_outside(metadata: Any) -> None:
        for info in metadata.storage_data.values():
            info.relative_path = "../../__0_0.distcp"
    rewrite_metadata(folder, point_outside)
    with pytest.raises(UsageError, match=r"lists data that is not a shard file of its folder: '../../__0_0.distcp'"):
        read_shards(folder, wanted())


def test_a_non_tensor_entry_of_the_shards_loads_as_data_only(tmp_path: Path) -> None:
    folder = saved_shards(tmp_path)
    mark = tmp_path / "ran"
    payload = tmp_path / "payload"
    torch.save(Trap(mark), payload)
    (folder / "__0_1.distcp").write_bytes(payload.read_bytes())

    def point_settings_at_payload(metadata: Any) -> None:
        for index, info in metadata.storage_data.items():
            if index.fqn.startswith("optim."):
                info.relative_path, info.offset, info.length = "__0_1.distcp", 0, payload.stat().st_size
    rewrite_metadata(folder, point_settings_at_payload)
    with pytest.raises(UsageError, match=r"the shards in .* cannot be read into this model: .*Weights only load failed"):
        read_shards(folder, wanted())
    assert not mark.exists()


def test_the_digests_recorded_at_a_save_are_checked_when_the_shards_are_named(tmp_path: Path) -> None:
    folder = saved_shards(tmp_path)
    checkpoint, token = tmp_path / "last.pt", folder.name
    digests = own_digests(checkpoint, token, 0)
    assert sorted(digests) == [".metadata", "__0_0.distcp"]
    assert resolve_shards(checkpoint, token, digests) == folder
    for form in ([], {"__0_0.distcp": "ab"}, {**digests, "../x": "ab"}, {**digests, ".metadata": 3}):
        with pytest.raises(UsageError, match="records its shards' digests in a form this trainer does not write"):
            resolve_shards(checkpoint, token, form)
    (folder / "__1_0.distcp").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"holds __1_0.distcp, which the checkpoint does not record"):
        resolve_shards(checkpoint, token, digests)
    (folder / "__1_0.distcp").unlink()
    flip_a_byte(folder / "__0_0.distcp")
    with pytest.raises(UsageError, match=r"__0_0.distcp is damaged"):
        resolve_shards(checkpoint, token, digests)
    (folder / "__0_0.distcp").unlink()
    with pytest.raises(UsageError, match=r"is incomplete: its shard .*__0_0.distcp is missing"):
        resolve_shards(checkpoint, token, digests)


def test_shards_rank_zero_cannot_see_mean_a_folder_the_machines_do_not_share(tmp_path: Path) -> None:
    folder = saved_shards(tmp_path)
    digests = {**own_digests(tmp_path / "last.pt", folder.name, 0), "__1_0.distcp": "0" * 64}  # rank 1's, on its own disk
    assert unseen_shards(tmp_path / "last.pt", folder.name, own_digests(tmp_path / "last.pt", folder.name, 0)) is None
    message = unseen_shards(tmp_path / "last.pt", folder.name, digests)
    assert message is not None and message.startswith("the shards __1_0.distcp that other processes wrote are not in")
    assert "need a --runs-root every machine shares" in message


def test_a_sharded_model_is_never_given_rank_zero_s_parts() -> None:
    with pytest.raises(NotImplementedError, match="loaded by every rank together"):
        FSDP(torch.device("cpu")).share_weights(nn.Linear(2, 2))


def test_save_checkpoint_needs_a_path() -> None:
    with pytest.raises(TypeError, match="needs at least one path"):
        run_tiny(fit=False).save_checkpoint()


def test_removing_a_checkpoint_removes_only_the_shards_folders_it_wrote(tmp_path: Path) -> None:
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"PK")
    root = shards_root(checkpoint)
    for name in ("0123456789abcdef", "fedcba9876543210"):
        (root / name).mkdir(parents=True)
        (root / name / "__0_0.distcp").write_bytes(b"x")
    (root / "notes").mkdir()  # not a name of ours: kept
    drop_stale_shards(checkpoint, keep="0123456789abcdef")
    assert sorted(p.name for p in root.iterdir()) == ["0123456789abcdef", "notes"]
    remove_checkpoint(checkpoint)
    assert not checkpoint.exists() and [p.name for p in root.iterdir()] == ["notes"]
    (root / "notes").rmdir()
    checkpoint.write_bytes(b"PK")
    (root / "0123456789abcdef").mkdir()
    remove_checkpoint(checkpoint)
    assert not root.exists()


@pytest.mark.parametrize("args, message", [
    (["--strategy", "fsdp"], "--strategy fsdp shards the model over several processes: add --nproc-per-node N"),
])
def test_fsdp_in_one_process_is_refused_before_the_run_folder(args: list[str], message: str, tmp_path: Path) -> None:
    done = CliRunner().invoke(make_cli(), ["run", *args, "--run-dir", str(tmp_path / "r")])
    assert done.exit_code == 2 and message in done.output
    assert len(done.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_fsdp_refuses_fp16_in_one_line_on_every_rank(site: Path, tmp_path: Path) -> None:
    done = launch(site, 2, ["--strategy", "fsdp", "--precision", "16", "--epochs", "1", "--run-dir", str(tmp_path / "r")])
    # Refused by the launcher, before any process starts: one line, not one per rank racing to say it.
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "not fp16" in done.stderr and "use --precision bf16" in done.stderr
    assert not (tmp_path / "r").exists()

"""Artefacts written whole: a save killed at any moment leaves the last complete version in place, and a
resume goes on from a complete checkpoint (distillery/atomic.py, training/checkpoints.py, save_adapter).

The kill tests SIGKILL a real save before each of its file system steps in turn (every file written, every
rename, every removal), one forked process per step, then read what the killed save left.
"""

import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distillery import atomic
from distillery.atomic import atomic_file, atomic_folder, remove_leftovers

REPO = Path(__file__).resolve().parents[2]
FINGERPRINT = "tiny-base"


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(params=["exchange", "rename aside"])
def swap(request, monkeypatch) -> SimpleNamespace:
    """Both ways a folder is swapped in: renameat2's exchange (Linux) and the rename-aside fallback; `calls`:
    what each exchange returned."""
    real, calls = atomic._exchange, []

    def exchange(a, b):
        calls.append(real(a, b) if request.param == "exchange" else False)
        return calls[-1]

    monkeypatch.setattr(atomic, "_exchange", exchange)
    return SimpleNamespace(way=request.param, calls=calls)


def test_a_folder_is_replaced_whole(tmp_path, swap):
    dest = tmp_path / "adapter"
    with atomic_folder(dest) as staging:
        (staging / "sub").mkdir()
        (staging / "a.txt").write_text("old")
        (staging / "sub" / "b.txt").write_text("old")
    assert _files(dest) == {"a.txt": "old", "sub/b.txt": "old"}
    with atomic_folder(dest) as staging:
        (staging / "c.txt").write_text("new")
    assert _files(dest) == {"c.txt": "new"}  # nothing of the old version is kept
    assert _names(tmp_path) == ["adapter"]  # nor anything beside it
    assert swap.calls == [swap.way == "exchange"]  # one swap, done the way this case names


def test_a_failed_write_leaves_the_old_folder(tmp_path, swap):
    dest = tmp_path / "model"
    with atomic_folder(dest) as staging:
        (staging / "unet.safetensors").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_folder(dest) as staging:
        (staging / "unet.safetensors").write_text("half")
        raise RuntimeError("disk full")
    assert _files(dest) == {"unet.safetensors": "old"}
    assert _names(tmp_path) == ["model"]


def test_a_file_is_replaced_whole(tmp_path):
    path = tmp_path / "oracle.safetensors"
    with atomic_file(path) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("ha")
        raise RuntimeError
    assert path.read_text() == "old" and _names(tmp_path) == ["oracle.safetensors"]
    with atomic_file(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and _names(tmp_path) == ["oracle.safetensors"]


def test_writes_under_way_and_leftovers_are_invisible_then_removed(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)  # a writer that is gone
    live = f"{os.getpid()}-{atomic._started(os.getpid())}-0b"
    reused = f"{os.getpid()}-1-0c"  # this pid, but another process's start time: a pid reused since
    for writer in (f"{dead}-1-0a", live, reused):  # folders a killed / a running write left
        (tmp_path / f".adapter.tmp-{writer}" / "adapter").mkdir(parents=True)
        (tmp_path / f".adapter.tmp-{writer}" / "adapter" / "adapter.json").write_text("{}")
    (tmp_path / f".lora.safetensors.tmp-{dead}-1-0d").write_text("half")  # a killed atomic_file
    with atomic_folder(tmp_path / "adapter") as staging:
        (staging / "adapter.json").write_text("{}")
        with atomic_file(tmp_path / "lora.safetensors") as tmp:
            tmp.write_text("lora")
            # what the server's scan of an adapters root matches (serving/engine.py): nothing being written
            assert not list(tmp_path.glob("*/adapter.json")) and not list(tmp_path.glob("*.safetensors"))
    kept = sorted(["adapter", "lora.safetensors", f".adapter.tmp-{live}"])  # a live writer's stays
    assert _names(tmp_path) == kept
    (tmp_path / f".other.tmp-{dead}-1-0e").mkdir()
    remove_leftovers(tmp_path)  # every destination's
    assert _names(tmp_path) == kept


# --- kill during save: one forked process per file system step, SIGKILLed before that step ---------------------


class KillAt:
    """Records the file system steps of a save once armed; SIGKILLs this process before step `at` (-1: never)."""

    def __init__(self, at: int):
        self.at, self.steps, self.armed = at, [], False

    def wrap(self, owner, name: str) -> None:
        real = getattr(owner, name)

        def step(*args, **kwargs):
            if self.armed:
                if len(self.steps) == self.at:
                    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs: as `kill -9`
                self.steps.append(name)
            return real(*args, **kwargs)

        setattr(owner, name, step)


def _watch_file_system(killer: KillAt) -> None:
    import safetensors.torch

    from distillery.adapters import files
    from distillery.distill.training import checkpoints

    for owner, name in [(os, "rename"), (os, "replace"), (atomic.shutil, "rmtree"), (atomic, "_exchange"),
                        (torch, "save"), (safetensors.torch, "save_file"), (checkpoints, "save_file"),
                        (files, "save_file"), (Path, "write_text")]:
        killer.wrap(owner, name)


def tiny_run(work: Path, steps: int, every: int = 2, before_save=lambda step: None):
    """A run of the shared checkpointing (a Linear, AdamW, an lr schedule, `Progress`), saving every `every`
    steps; returns the step it resumed from (0: none), the final weight and the progress."""
    from accelerate import Accelerator

    from distillery.distill.training.checkpoints import Progress, checkpoint, keep_trainable_in_checkpoints, resume

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    model, opt = accelerator.prepare(model, opt)
    progress = Progress(torch.Generator().manual_seed(0))
    accelerator.register_for_checkpointing(schedule, progress)
    keep_trainable_in_checkpoints(accelerator, lambda key: True)
    resume(accelerator, work)
    resumed_from = progress.step
    while progress.step < steps:
        x = torch.randn(8, 4, generator=progress.generator)  # (B, 4)
        loss = (model(x) - x.flip(1)).pow(2).mean()
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        progress.step += 1
        progress.history.append(loss.item())
        if progress.step % every == 0:
            before_save(progress.step)
            checkpoint(accelerator, work, progress.step)
    return resumed_from, accelerator.unwrap_model(model).weight.detach().clone(), progress


def tiny_peft_unet():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2.0, target_modules=["to_q", "to_v"]))
    return unet


def save_version(folder: Path, unet, version: int) -> None:
    """An adapter whose every tensor holds `version`, and says so in its metadata."""
    from distillery.adapters import AdapterMeta, save_adapter
    from distillery.sampling.guidance import EMBEDDING_DIM

    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.data.fill_(version)
    projection = torch.nn.Linear(EMBEDDING_DIM, 4, bias=False)
    projection.weight.data.fill_(version)
    meta = AdapterMeta(kind="guidance", base_fingerprint=FINGERPRINT, rank=2, alpha=2.0,
                       target_modules=["to_q", "to_v"], w_max=5.0, embedding_dim=EMBEDDING_DIM,
                       training={"version": version})
    save_adapter(folder, unet, "default", meta, projection)


def version_of(folder: Path) -> int:
    """The version an adapter folder holds, read as the server reads it; fails on a mix of two versions."""
    from distillery.adapters import read_adapter

    files = read_adapter(folder, FINGERPRINT)
    version = files.meta.training["version"]
    assert all(bool((t == version).all()) for t in [*files.lora.values(), files.projection]), folder
    return version


def _scenario(scenario: str, folder: Path, killer: KillAt) -> None:
    if scenario == "checkpoint":  # saves at steps 2, 4 and 6; the one at 6 is killed
        tiny_run(folder / "work", steps=6, before_save=lambda step: setattr(killer, "armed", step == 6))
    else:  # adapter version 1 is in place; writing version 2 over it is killed
        if scenario == "adapter, rename aside":
            atomic._exchange = lambda a, b: False
        unet = tiny_peft_unet()
        save_version(folder / "adapter", unet, 1)
        killer.armed = True
        save_version(folder / "adapter", unet, 2)
    killer.armed = False


SCENARIOS = ("checkpoint", "adapter, exchange", "adapter, rename aside")


def fork_server(root: str) -> None:
    """In a fresh interpreter: import once (seconds here), then fork one child per kill point of each scenario
    (milliseconds); prints each scenario's steps and each child's exit status as JSON."""
    torch.set_num_threads(1)  # no thread pool exists before the forks
    from accelerate import Accelerator  # noqa: F401
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from peft import LoraConfig  # noqa: F401

    from distillery.adapters import save_adapter  # noqa: F401

    def child(scenario: str, at: int, folder: Path) -> int:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                killer = KillAt(at)
                _watch_file_system(killer)
                _scenario(scenario, folder, killer)
                (folder / "steps.json").write_text(json.dumps(killer.steps))
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        return os.waitpid(pid, 0)[1]

    report = {}
    for scenario in SCENARIOS:
        base = Path(root) / scenario
        (base / "whole").mkdir(parents=True)
        assert child(scenario, -1, base / "whole") == 0, scenario
        steps = json.loads((base / "whole" / "steps.json").read_text())
        statuses = {}
        for at in range(len(steps)):
            (base / str(at)).mkdir()
            statuses[at] = child(scenario, at, base / str(at))
        report[scenario] = {"steps": steps, "killed": [at for at, s in statuses.items()
                                                      if os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGKILL]}
    print(json.dumps(report))


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("killed")
    out = subprocess.run([sys.executable, "-c", f"from tests.distill.test_atomic_artefacts import fork_server; "
                          f"fork_server({str(root)!r})"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr[-3000:]
    return root, json.loads(out.stdout.strip().splitlines()[-1])


def test_a_checkpoint_save_killed_at_any_step_resumes_from_a_complete_checkpoint(killed_saves, tmp_path):
    from distillery.distill.training.checkpoints import LATEST, complete

    root, report = killed_saves
    steps = report["checkpoint"]["steps"]
    assert {"save", "save_file", "write_text", "rename", "replace", "rmtree"} <= set(steps), steps
    assert report["checkpoint"]["killed"] == list(range(len(steps)))
    named = steps.index("replace")  # `latest` names checkpoint-6 from this step on
    _, straight, uninterrupted = tiny_run(tmp_path / "straight", steps=8, every=100)
    for at in range(len(steps)):
        work = root / "checkpoint" / str(at) / "work"
        assert all(complete(p) for p in work.glob("checkpoint-*")), (at, steps[at])  # never a torn one by name
        assert complete(work / (work / LATEST).read_text().strip())
        resumed_from, weight, progress = tiny_run(work, steps=8)
        assert resumed_from == (6 if at > named else 4), (at, steps[at])
        torch.testing.assert_close(weight, straight, rtol=0, atol=1e-6)  # as if it had never stopped
        assert progress.history == pytest.approx(uninterrupted.history, abs=1e-6)
        assert _names(work) == ["checkpoint-6", "checkpoint-8", "latest"]  # the killed save's leftovers are gone


def test_a_finished_checkpoint_save_keeps_the_last_two(killed_saves):
    root, _ = killed_saves
    work = root / "checkpoint" / "whole" / "work"
    assert _names(work) == ["checkpoint-4", "checkpoint-6", "latest"]
    assert (work / "latest").read_text() == "checkpoint-6\n"


@pytest.mark.parametrize("scenario", SCENARIOS[1:])
def test_an_adapter_save_killed_at_any_step_leaves_the_old_adapter_or_the_new(killed_saves, scenario):
    root, report = killed_saves
    steps = report[scenario]["steps"]
    assert report[scenario]["killed"] == list(range(len(steps)))
    # the step that puts version 2 in place; aside, the old one is renamed away first: a moment with none
    swap = steps.index("_exchange") if scenario.endswith("exchange") else len(steps) - 1 - steps[::-1].index("rename")
    unet = tiny_peft_unet()
    for at in range(len(steps)):
        adapter = root / scenario / str(at) / "adapter"
        if scenario.endswith("aside") and at == swap:
            assert not adapter.exists(), (at, steps[at])
        else:
            assert version_of(adapter) == (2 if at > swap else 1), (at, steps[at])
        save_version(adapter, unet, 3)  # the next save takes its place and clears what the killed one left
        assert version_of(adapter) == 3 and _names(adapter.parent) == ["adapter"]
    assert version_of(root / scenario / "whole" / "adapter") == 2


def test_two_processes_write_one_checkpoint_and_a_resume_goes_on_from_it(tmp_path):
    """Under `accelerate launch` (2 CPU processes, gloo) every rank writes into the main one's staging folder."""
    from distillery.distill.training.checkpoints import complete

    work = tmp_path / "work"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "tests.distill.test_atomic_artefacts", str(work), "4"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={
        "OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert _names(work) == ["checkpoint-2", "checkpoint-4", "latest"] and complete(work / "checkpoint-4")
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(_names(work / "checkpoint-4"))
    resumed_from, weight, _ = tiny_run(work, steps=6)
    _, straight, _ = tiny_run(tmp_path / "straight", steps=6, every=100)
    assert resumed_from == 4
    torch.testing.assert_close(weight, straight, rtol=0, atol=1e-6)  # both ranks saw the same batches: one run


if __name__ == "__main__":  # a rank of the two-process test
    tiny_run(Path(sys.argv[1]), int(sys.argv[2]))

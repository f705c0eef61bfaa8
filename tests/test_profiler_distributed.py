"""The profiler on several ranks (CPU, gloo): `lora-cost profile --nproc-per-node 2` launches through
torch.distributed.run, every rank writes its profile and the launcher merges them; a script started by
torchrun itself that calls `lora_cost.profile()` gets the merged report on rank 0; a rank that fails
leaves its profile and the merged report marks it. The merge alone is tested without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# DDP over gloo with LoRA on a tiny Llama (tests/tiny_models.py's shapes), one step of 2 x 24 tokens
DDP_LORA = '''
import os, sys
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist, peft
from torch.nn.parallel import DistributedDataParallel as DDP
import tiny_models
dist.init_process_group("gloo")
model = peft.get_peft_model(tiny_models.build("llama"),
                            peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
model = DDP(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for i in range(int(sys.argv[1])):
    if os.environ.get("CRASH_RANK") == os.environ["RANK"] and i == 2:
        raise ValueError("boom")
    ids = torch.randint(0, 512, (tiny_models.B, tiny_models.S))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
dist.destroy_process_group()
'''

# plain torch DDP (no transformers: quicker to start), rank CRASH_RANK raising at its third step
PLAIN_DDP = '''
import os, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo")
torch.manual_seed(0)
model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for i in range(int(sys.argv[1])):
    if os.environ.get("CRASH_RANK") == os.environ["RANK"] and i == 2:
        raise ValueError("boom")
    model(torch.randn(4, 32)).sum().backward()
    opt.step(); opt.zero_grad()
dist.destroy_process_group()
'''

# a script started by torchrun that profiles itself, sharded with FSDP2 (fully_shard per Linear, then the
# root; plain torch: quick to start)
IN_SCRIPT = '''
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import lora_cost
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
for layer in (model[0], model[2]):
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
with lora_cost.profile(warmup=1, steps=2, flops=False) as p:
    for _ in range(3):
        model(torch.randn(4, 32)).sum().backward()
        opt.step(); opt.zero_grad()
r = p.result
out = {{"rank": r.rank, "world": r.world_size, "status": r.status,
        "collectives": {{c.name: c.calls for c in r.communication.collectives}}}}
if dist.get_rank() == 0:
    out["merged"] = p.merged.to_dict()
else:
    out["merged"] = p.merged
open({out!r} + f"/rank{{dist.get_rank()}}.json", "w").write(json.dumps(out))
dist.barrier()  # both ranks done with every collective before the group goes (gloo's threads then idle)
dist.destroy_process_group()
'''


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _cli(tmp_path, script_text, *args, **env):
    script = tmp_path / "train.py"
    script.write_text(script_text)
    out = tmp_path / "out" / "profile.json"
    res = subprocess.run([sys.executable, "-c", "from lora_cost.cli import main; main()", "profile", "--nproc-per-node",
                          "2", "--warmup", "1", "--steps", "2", "--no-flops", "--json", "--out", str(out), str(script),
                          "--", *args], capture_output=True, text=True, env=_env(**env), timeout=240)
    return res, out


def test_two_ranks_ddp_lora_profiled_and_merged(tmp_path):
    res, out = _cli(tmp_path, DDP_LORA.format(tests=str(ROOT / "tests")), "3")
    assert res.returncode == 0, res.stderr[-3000:]
    merged = json.loads(res.stdout)
    assert merged == json.loads(out.read_text())
    assert merged["schema"] == "lora-cost-distributed-profile/1" and merged["status"] == "ok"
    assert merged["world_size"] == 2 and merged["failed_ranks"] == [] and merged["exit_code"] == 0
    from lora_cost.profiler import load_profile
    ranks = [load_profile(out.parent / "profile.ranks" / f"profile.rank{r}.json") for r in (0, 1)]
    for r, p in enumerate(ranks):
        assert (p.rank, p.world_size, p.status, p.steps_detected, len(p.measured)) == (r, 2, "ok", 3, 2)
        # DDP all-reduces the gradients of every step: one bucket here (the LoRA factors are 24 KiB)
        reduce = {c.name: c for c in p.communication.collectives}["gloo:all_reduce"]
        assert reduce.calls >= 3 and reduce.seconds > 0 and p.communication.per_step_s > 0
        # the per-rank categories add up, and the merged row shows this rank's
        last = p.measured[-1]
        for b in last.boundaries:
            assert b.memory.named_total == b.memory.live_total
        row = merged["ranks"][r]
        assert row["peak_bytes"] == max(s.peak_bytes for s in p.measured) and row["status"] == "ok"
    # DDP replicates: every rank holds the same parameters, gradients and AdamW state, and they are
    # what one process holds: LoRA r=4 on q_proj (64->64) and v_proj (64->32) of 3 layers, fp32:
    # 3 x 4 x (64 + 64 + 64 + 32) = 2,688 trainable parameters = 10,752 bytes of gradients, 2 x that in moments
    mem = [p.measured[-1].boundaries for p in ranks]
    at_backward_end = [next(b.memory for b in bs if b.name == "backward_end") for bs in mem]
    assert at_backward_end[0].trainable_params == at_backward_end[1].trainable_params == 2688 * 4
    assert at_backward_end[0].gradients == at_backward_end[1].gradients == 2688 * 4
    steps = 12 * 4  # peak AdamW keeps a 0-d fp32 step per tensor (capturable=False: on the CPU)
    assert at_backward_end[0].optimizer_state == at_backward_end[1].optimizer_state == 2 * 2688 * 4 + steps
    est = ranks[0].estimate
    assert est is not None and est.trainable_params == 2688


def test_a_failing_rank_leaves_its_profile_and_is_marked(tmp_path):
    res, out = _cli(tmp_path, PLAIN_DDP, "4", CRASH_RANK="1")
    assert res.returncode != 0
    merged = json.loads(out.read_text())
    assert merged["status"] == "failed" and 1 in merged["failed_ranks"]
    row = merged["ranks"][1]
    assert row["status"] == "error" and "ValueError: boom" in row["note"] and row["steps_detected"] == 2
    assert (out.parent / "profile.ranks" / "profile.rank1.json").exists()
    # rank 0 either failed in its next collective (its profile written) or was stopped by the launcher
    assert merged["ranks"][0]["status"] in ("error", "interrupted", "missing")


def test_script_started_by_torchrun_profiles_itself(tmp_path):
    script = tmp_path / "self_profiled.py"
    script.write_text(IN_SCRIPT.format(out=str(tmp_path)))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, env=_env(), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r0["world"], r1["rank"], r1["world"]) == (0, 2, 1, 2)
    # FSDP2 all-gathers the parameters for forward and backward; gloo has no reduce-scatter, so FSDP2
    # reduces gradients with an all-reduce there
    assert r0["collectives"].get("gloo:all_gather", 0) >= 3 and r0["collectives"].get("gloo:all_reduce", 0) >= 3
    assert r1["merged"] is None
    merged = r0["merged"]
    assert merged["world_size"] == 2 and merged["status"] == "ok" and [r["rank"] for r in merged["ranks"]] == [0, 1]
    # each rank stores its dim-0 shard (the DTensor's local tensor): of 64x32 + 64 + 8x64 + 8 = 2,632 fp32
    # parameters, 32x32 + 32 + 4x64 + 4 = 1,316 = 5,264 bytes; the same in gradients; AdamW two moments of
    # it plus a 4-byte step per parameter tensor (4 tensors)
    for row in merged["ranks"]:
        mem = row["memory"]
        assert (mem["trainable_params"], mem["gradients"], mem["optimizer_state"]) == (5264, 5264, 2 * 5264 + 16)
        assert sum(v for k, v in mem.items() if k != "live_total") == mem["live_total"]


# ---- the merge alone (no torch) -------------------------------------------------------------------
@pytest.mark.fast
def test_merge_marks_missing_ranks_and_measures_imbalance():
    from lora_cost.profiler.merge import merge_profiles
    from lora_cost.profiler.results import (Boundary, Categories, Environment, PhaseMeasurement, ProfileResult,
                                            StepMeasurement)

    def prof(rank, peak, status="ok"):
        cats = Categories(10, 0, 0, 10, 20, 0, 0, 40)
        step = StepMeasurement(2, 1, 1, 1, 0.5, peak, None, 0, 0.0, (PhaseMeasurement("forward", peak, 0.1),),
                               (Boundary("backward_end", 0, cats, None),))
        env = Environment("3", "linux", None, None, None, None, None, "cpu", "cpu", None)
        return ProfileResult("lora-cost-profile/1", status, 0 if status == "ok" else 1, "t.py", (), 1, 1, 2, "cpu",
                             "none", (step,), None, (), None, None, (), env, None, None, (), rank=rank, world_size=4,
                             error=None if status == "ok" else "ValueError: x")

    m = merge_profiles({0: prof(0, 300), 1: prof(1, 100), 2: prof(2, 200, "error"), 3: None}, 4, exit_code=1)
    assert m.status == "failed" and m.failed_ranks == (2, 3)
    assert m.busiest_rank == 0 and m.peak_bytes == 300 and m.mean_peak_bytes == 200
    assert m.imbalance == pytest.approx(0.5)  # (300 - 200) / 200
    assert m.ranks[3].status == "missing" and m.ranks[2].note.endswith("ValueError: x")
    assert m.ranks[0].memory.gradients == 10
    tie = merge_profiles({0: prof(0, 100), 1: prof(1, 100)}, 2)
    assert tie.busiest_rank == 0 and tie.imbalance == 0 and tie.status == "ok"
    json.loads(m.to_json())
    import io
    from rich.console import Console
    from lora_cost.report.distributed_terminal import render_distributed
    out = io.StringIO()
    render_distributed(Console(file=out, width=100), m)
    text = out.getvalue()
    assert "rank 3: no profile" in text and "ranks that did not end normally: 2, 3" in text and "busiest rank 0" in text


@pytest.mark.fast
def test_bad_nproc_is_one_line(tmp_path):
    from click.testing import CliRunner
    from lora_cost.cli import main
    script = tmp_path / "t.py"
    script.write_text("pass\n")
    for bad in ("0", "-1", "5000"):
        res = CliRunner().invoke(main, ["profile", "--nproc-per-node", bad, str(script)])
        assert res.exit_code == 2 and "--nproc-per-node" in res.output and "Traceback" not in res.output

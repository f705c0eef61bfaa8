"""The JSON contract of `lora-cost estimate --json` (other tools depend on these names)."""

from __future__ import annotations

from ..results import (DeviceMemory, DistributedEstimate, Estimate, FlopEstimate, GpuFit, MemoryEstimate, PhasePeak,
                       RunHeader, ServingEstimate, ServingVariant, Term)

SERVING_CONVENTION = ("per generated token with a KV cache, attending to context_positions positions; matmul FLOPs, "
                      "2 per multiply-add (torch.utils.flop_counter), elementwise ops not counted; no timing")


def _terms(terms: tuple[Term, ...]) -> dict[str, int]:
    return {t.name: t.value for t in terms}


def run_header(r: RunHeader) -> dict:
    """The inputs echoed back and the parameter counts: the head of both engines' JSON (an Estimate
    and a TraceResult are each a RunHeader)."""
    return {
        "inputs": {
            "model": r.model, "method": r.method, "r": r.r, "targets": list(r.targets), "batch": r.batch, "seq": r.seq,
            "precision": r.precision, "optimizer": r.optimizer, "grad_checkpointing": r.grad_checkpointing,
            "attention": r.attention, "dropout": r.dropout, "method_options": r.method_options,
        },
        "model": r.model,
        "family": r.family,
        "method": r.method,
        "trainable_params": r.trainable_params,
        "total_params": r.total_params,
        "trainable_percent": 100.0 * r.trainable_params / r.total_params if r.total_params else 0.0,
        "adapted_modules": r.adapted_modules,
    }


def refresh_json(m: MemoryEstimate) -> dict:
    """task "galore": `memory.refresh`, the optimizer's refresh step (absent when every step is alike)."""
    r = m.refresh
    if r is None:
        return {}
    return {"refresh": {"every_steps": r.every_steps, "peak_bytes": r.peak_bytes, "peak_phase": r.peak_phase,
                        "moment": r.moment, "device_bytes": r.device_bytes, "above_steady_bytes": r.above_steady_bytes,
                        "components": _terms(r.components)}}


def estimate_to_json(e: Estimate) -> dict:
    m, f = e.memory, e.flops
    doc = {
        **run_header(e),
        "memory": {
            "peak_bytes": m.peak_bytes,
            "peak_phase": m.peak_phase,
            "device_bytes": m.device_bytes,
            **device_json(m.device),
            "steady_bytes": m.steady_bytes,
            "saved_activation_bytes": m.saved_activation_bytes,
            "components": _terms(m.components),
            "phases": {p.phase: {"peak_bytes": p.peak_bytes, "moment": p.moment, "terms": _terms(p.terms)} for p in m.phases},
            "saved_by_kind": _terms(m.saved_by_kind),
            "terms": [{"name": t.name, "bytes": t.value, "formula": t.formula, "explanation": t.explanation} for t in m.terms],
            **refresh_json(m),
        },
        "flops": {
            "forward": f.forward, "backward": f.backward, "total": f.total,
            "forward_uncounted_by_flopcounter": f.forward_uncounted,
            "backward_uncounted_by_flopcounter": f.backward_uncounted,
            "convention": "2 FLOPs per multiply-add (torch.utils.flop_counter); fvcore reports half",
            "terms": [{"name": t.name, "flops": t.value, "formula": t.formula} for t in f.terms],
        },
        "gpu": gpu_fit_json(e.gpu),
        "warnings": list(e.warnings),
        "assumptions": list(e.assumptions),
    }
    if e.serving is not None:  # only when asked for (estimate --serving): absent otherwise
        doc["serving"] = serving_json(e.serving)
    if e.distributed is not None:  # --gpus only: every other name keeps its meaning, for the busiest rank
        d = e.distributed
        doc["inputs"]["gpus"], doc["inputs"]["nodes"], doc["inputs"]["sharding"] = d.gpus, d.nodes, d.sharding
        doc["inputs"]["sharding_settings"] = d.settings
        doc["memory"]["host_bytes"] = m.host_bytes
        doc["communication"] = communication_json(d)
    return doc


def communication_json(d: DistributedEstimate) -> dict:
    return {"bytes_per_rank": dict(d.communication_bytes), "wire_bytes_per_rank": d.wire_bytes,
            "link": d.link, "bandwidth_bytes_per_s": d.bandwidth_bytes_per_s, "compute_time_s": d.compute_time_s,
            "communication_time_s": d.communication_time_s,
            "exposed_communication_time_s": d.exposed_communication_time_s, "overlap": d.overlap}


def _variant_json(v: ServingVariant | None) -> dict | None:
    if v is None:
        return None
    return {"extra_weight_bytes": v.extra_weight_bytes, "extra_flops_per_token": v.extra_flops_per_token,
            "extra_flops_per_forward_call": v.extra_flops_per_forward,
            "extra_sequential_ops_per_block": v.extra_sequential_ops_per_block, "flops_per_token": v.flops_per_token}


def serving_json(s: ServingEstimate) -> dict:
    return {
        "context_positions": s.context_positions,
        "convention": SERVING_CONVENTION,
        "base": {"weight_bytes": s.base_weight_bytes, "flops_per_token": s.base_flops_per_token,
                 "matmul_flops_per_token": s.base_matmul_flops_per_token,
                 "attention_flops_per_token": s.base_attention_flops_per_token},
        "mergeable": s.mergeable,
        "extra_positions": s.extra_positions,
        "merged": _variant_json(s.merged),
        "unmerged": _variant_json(s.unmerged),
        "note": s.note,
    }


def serving_from_json(doc: dict) -> ServingEstimate:
    def variant(v: dict | None) -> ServingVariant | None:
        if v is None:
            return None
        return ServingVariant(extra_weight_bytes=v["extra_weight_bytes"], extra_flops_per_token=v["extra_flops_per_token"],
                              extra_flops_per_forward=v["extra_flops_per_forward_call"],
                              extra_sequential_ops_per_block=v["extra_sequential_ops_per_block"],
                              flops_per_token=v["flops_per_token"])

    base = doc["base"]
    return ServingEstimate(context_positions=doc["context_positions"], base_weight_bytes=base["weight_bytes"],
                           base_matmul_flops_per_token=base["matmul_flops_per_token"],
                           base_attention_flops_per_token=base["attention_flops_per_token"],
                           mergeable=doc["mergeable"], extra_positions=doc["extra_positions"],
                           merged=variant(doc["merged"]), unmerged=variant(doc["unmerged"]), note=doc["note"])


def device_json(d) -> dict:
    """How device_bytes is made up (analytic/device.py): reserved, context, fragmentation, paged state."""
    if d is None:
        return {}
    return {"reserved_bytes": d.reserved_bytes, "context_bytes": d.context_bytes,
            "fragmentation_bytes": d.fragmentation_bytes, "paged_optimizer_bytes": d.paged_bytes,
            "paged_optimizer_resident": d.paged_resident, "device_uncertainty_bytes": d.uncertainty_bytes,
            "context_measured": d.context_measured, "reserved_model": d.reserved_model}


def device_from_json(mem: dict):
    if "reserved_bytes" not in mem:
        return None
    return DeviceMemory(reserved_bytes=mem["reserved_bytes"], context_bytes=mem["context_bytes"],
                        paged_bytes=mem["paged_optimizer_bytes"], paged_resident=mem["paged_optimizer_resident"],
                        fragmentation_bytes=mem["fragmentation_bytes"], device_bytes=mem["device_bytes"],
                        uncertainty_bytes=mem["device_uncertainty_bytes"], context_measured=mem["context_measured"],
                        reserved_model=mem["reserved_model"])


def gpu_fit_json(g: GpuFit | None) -> dict | None:
    if g is None:
        return None
    return {"name": g.gpu, "memory_bytes": g.memory_bytes, "fits": g.fits, "verdict": g.verdict,
            "uncertainty_bytes": g.uncertainty_bytes, "headroom_bytes": g.headroom_bytes,
            "step_time_s": g.step_time_s, "utilisation": g.utilisation}


def estimate_from_json(doc: dict) -> Estimate:
    """An `Estimate` back from `estimate_to_json`'s document (a saved profile holds one), such that
    `estimate_to_json(estimate_from_json(doc)) == doc`. What the document does not hold comes back
    empty: the formulas and explanations of components, phase and saved-by-kind terms, the
    explanations of FLOP terms, and the categories of the stored quantities."""
    inputs, mem, fl = doc["inputs"], doc["memory"], doc["flops"]

    def terms(values: dict) -> tuple[Term, ...]:
        return tuple(Term(name, int(value), "", "") for name, value in values.items())

    memory = MemoryEstimate(
        peak_bytes=mem["peak_bytes"], peak_phase=mem["peak_phase"], components=terms(mem["components"]),
        phases=tuple(PhasePeak(phase, p["peak_bytes"], p["moment"], terms(p["terms"])) for phase, p in mem["phases"].items()),
        device_bytes=mem["device_bytes"], steady_bytes=mem["steady_bytes"],
        saved_activation_bytes=mem["saved_activation_bytes"], saved_by_kind=terms(mem["saved_by_kind"]),
        terms=tuple(Term(t["name"], t["bytes"], t["formula"], t["explanation"]) for t in mem["terms"]),
        device=device_from_json(mem), host_bytes=mem.get("host_bytes"))
    flops = FlopEstimate(forward=fl["forward"], backward=fl["backward"],
                         forward_uncounted=fl["forward_uncounted_by_flopcounter"],
                         backward_uncounted=fl["backward_uncounted_by_flopcounter"],
                         terms=tuple(Term(t["name"], t["flops"], t["formula"], "") for t in fl["terms"]))
    g = doc["gpu"]
    gpu = None if g is None else GpuFit(gpu=g["name"], memory_bytes=g["memory_bytes"], fits=g["fits"],
                                        headroom_bytes=g["headroom_bytes"], step_time_s=g["step_time_s"],
                                        utilisation=g["utilisation"], verdict=g.get("verdict", ""),
                                        uncertainty_bytes=g.get("uncertainty_bytes", 0))
    return Estimate(
        model=doc["model"], family=doc["family"], method=doc["method"], r=inputs["r"], targets=tuple(inputs["targets"]),
        batch=inputs["batch"], seq=inputs["seq"], precision=inputs["precision"], optimizer=inputs["optimizer"],
        grad_checkpointing=inputs["grad_checkpointing"], attention=inputs["attention"], dropout=inputs["dropout"],
        method_options=inputs["method_options"], trainable_params=doc["trainable_params"],
        total_params=doc["total_params"], adapted_modules=doc["adapted_modules"], memory=memory, flops=flops, gpu=gpu,
        warnings=tuple(doc["warnings"]), assumptions=tuple(doc["assumptions"]),
        serving=serving_from_json(doc["serving"]) if "serving" in doc else None,
        distributed=_distributed_from_json(doc) if "communication" in doc else None)


def _distributed_from_json(doc: dict) -> DistributedEstimate:
    c, i = doc["communication"], doc["inputs"]
    return DistributedEstimate(gpus=i["gpus"], nodes=i["nodes"], sharding=i["sharding"], settings=i["sharding_settings"],
                               communication_bytes=c["bytes_per_rank"], wire_bytes=c["wire_bytes_per_rank"],
                               bandwidth_bytes_per_s=c["bandwidth_bytes_per_s"], link=c["link"],
                               compute_time_s=c["compute_time_s"], communication_time_s=c["communication_time_s"],
                               exposed_communication_time_s=c["exposed_communication_time_s"], overlap=c["overlap"])

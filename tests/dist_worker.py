"""Run under torchrun by tests/test_distributed.py: questions through the distributed path, each
rank writing what it saw. Usage: torchrun ... tests/dist_worker.py SPEC.json (see the test)."""
from __future__ import annotations

import json
import os
import sys


def _local_rows(w) -> int:
    """Rows of a weight this rank holds (a DTensor's local shard under tensor parallel)."""
    return int((w.to_local() if hasattr(w, "to_local") else w).shape[0])


def main(spec_path: str) -> int:
    from adapttoken import distributed
    from adapttoken.entropy import early_stop, score_groups
    from adapttoken.groups import split_groups
    from adapttoken.models.loading import load_model
    from adapttoken.pipeline import AdaptTokenConfig, answer, ask, prepare
    from adapttoken.question import Question
    from adapttoken.rank import RankedGroups

    spec = json.loads(open(spec_path).read())
    out = spec["out"]
    lay = distributed.init(tp=spec.get("tp", 1), device="cpu")
    model = load_model(spec["model"], dtype="fp32", device="cpu", layout=lay if lay.tp > 1 else None)
    q = Question(spec["question"], tuple(spec["options"]))
    cfg = AdaptTokenConfig(num_frames=spec["frames"], group_size=spec["group_size"],
                           budget=spec["budget"], max_pixels=spec.get("max_pixels", 308 * 560),
                           stop_threshold=spec.get("stop_threshold", 0.2),
                           stop_confirm=spec.get("stop_confirm", 2),
                           max_new_tokens=spec.get("max_new_tokens", 8), decode_workers=0)
    mine = {}
    for method in spec["methods"]:
        model.clear_cache()
        if method == "lite_rounds":       # the lower-level API, to see every rank's stop point
            video = prepare(model, spec["video"], cfg)
            groups = split_groups(video, cfg.group_size, cfg.layout)
            scored = early_stop(score_groups(RankedGroups(model, groups, q)), cfg.stop_threshold,
                                cfg.min_groups, cfg.stop_confirm)
            with distributed.ParallelQuestion(lay, scored) as pq:
                sel = pq.select(cfg.budget)
                res = None if sel is None else answer(sel, cfg.max_new_tokens)
            mine[method] = {"processed": pq.processed, "skipped": pq.skipped,
                            "passes_run": pq.passes_run, "passes_dropped": pq.passes_dropped}
        elif method == "probe":              # group passes on every rank, kept as each rank saw them
            video = prepare(model, spec["video"], cfg)
            groups = split_groups(video, cfg.group_size)
            out_probe = {}
            for agg in ("max", "mean"):
                scored = score_groups(RankedGroups(model, groups, q, aggregation=agg))
                out_probe[agg] = [{"entropy": s.entropy, "gids": s.pass_.gids.tolist(),
                                   "scores": s.pass_.scores.float().tolist()}
                                  for s in (scored.score(g) for g in range(min(3, len(groups))))]
            layer = model.adapter.text_model.layers[0]
            mine[method] = {"groups": out_probe, "q_rows": _local_rows(layer.self_attn.q_proj.weight),
                            "mlp_rows": _local_rows(layer.mlp.up_proj.weight)}
            continue
        elif method == "abort_after_select":     # rank 0 fails while the others serve rows
            video = prepare(model, spec["video"], cfg)
            scored = score_groups(RankedGroups(model, split_groups(video, cfg.group_size), q))
            try:
                with distributed.ParallelQuestion(lay, scored) as pq:
                    sel = pq.select(cfg.budget)
                    if lay.is_main:
                        raise RuntimeError("injected failure on rank 0")
                mine[method] = {"error": None}
            except Exception as e:  # noqa: BLE001 - what each rank saw is the result
                mine[method] = {"error": type(e).__name__, "message": str(e)[:200]}
            continue
        else:
            res = ask(model, spec["video"], q, config=cfg, method=method, layout=lay)
            mine[method] = {"result": res is not None}
        if lay.is_main:
            with open(os.path.join(out, f"{method}.json"), "w") as fh:
                fh.write(res.to_json())
    with open(os.path.join(out, f"rank{lay.rank}.json"), "w") as fh:
        json.dump(mine, fh)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

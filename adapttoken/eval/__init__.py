"""Benchmark evaluation: the paper's protocol on VideoMME, MLVU, LongVideoBench and LVBench.

    python -m adapttoken eval videomme --data DIR --method native adapttoken lite --out runs/vmme
    python -m adapttoken eval score runs/vmme [--profile lmms_eval]

`data` reads each benchmark's on-disk layouts into `Item`s, `profiles` holds the prompt texts and
answer parsers of the two conventions (flexselect2025, lmms_eval; plain: our own layout),
`metrics` each benchmark's metric, `runner` the resumable, video-sharded run (one append-only JSONL per worker), `report`
the Table-1-shaped report, `command` the command line. Sources of every field name, prompt text
and parse rule: docs/EVAL.md. Nothing here imports `adapttoken.training`.
"""
BENCHES = ("videomme", "mlvu", "longvideobench", "lvbench", "jsonl")
PROFILES = ("flexselect2025", "lmms_eval", "plain")

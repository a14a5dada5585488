"""`python -m suite run CONFIG [--out FILE] [--force] [--merge] [--quiet] [--repair] [--jobs N]
[--backend local|ray] [--address auto|HOST:PORT] [--retries N] [--cell-cpus N] [--cell-memory GB]
[--dry-run [--device-memory SIZE] [--compare RESULTS.jsonl]]`: run an experiment grid, or predict its
memory (suite/memory_model.py) without running it."""
from __future__ import annotations

NAME = "run"
HELP = ("run an experiment grid from a YAML config (configs/*.yaml): each cell in a fresh process, "
        "results appended to results/<name>.jsonl; finished cells are skipped on a rerun.")


def add_arguments(parser) -> None:
    parser.add_argument("config", help="experiment config, e.g. configs/smoke.yaml")
    parser.add_argument("--out", help="results file (default: results/<config name>.jsonl)")
    parser.add_argument("--force", action="store_true", help="rerun every cell, even those already in the results")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--merge", action="store_true",
                        help="append to a results file that holds another grid's records (refused otherwise)")
    parser.add_argument("--repair", action="store_true",
                        help="move a damaged last line of the results file to <file>.corrupt, then run")
    parser.add_argument("--jobs", type=int, default=None,
                        help="local backend: cells run at once, each with cpu_count/JOBS torch threads (default 1: "
                             "timings undisturbed by a neighbour)")
    dry = parser.add_argument_group("memory model (suite/memory_model.py)")
    dry.add_argument("--dry-run", action="store_true",
                     help="run nothing: print every cell's predicted peak memory per phase on its device, from "
                          "the models' configs alone (no weight is read), and mark the cells that will not fit")
    dry.add_argument("--device-memory", metavar="SIZE",
                     help="with --dry-run: the device's size, which every cell's predicted peak must fit in, e.g. "
                          "24GB, 80GiB, 512MB (accelerate's units: GB = 10^9 bytes, GiB = 2^30; default: the visible "
                          "GPU's for cuda cells, the host's RAM for cpu cells). Not an offload cap: a grid's "
                          "device_memory: (with offload:) caps the weights kept on the device, and the prediction uses it")
    dry.add_argument("--compare", metavar="RESULTS",
                     help="with --dry-run: also print predicted vs measured peak per phase and the error of "
                          "every cell recorded in RESULTS (a results .jsonl of this grid)")
    ray = parser.add_argument_group("Ray backend (pip install '.[ray]')")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: cell processes on this host (default); ray: each cell a Ray task on a Ray "
                             "cluster (a GPU for a CUDA cell, --cell-cpus CPUs for every cell)")
    ray.add_argument("--address", help="Ray cluster to join: auto (the one `ray start` runs on this host) or "
                                       "HOST:PORT; default: RAY_ADDRESS, else a Ray instance started for this run")
    ray.add_argument("--retries", type=int, default=2,
                     help="times a cell is rerun when its process is killed or its worker or node is lost (default 2)")
    ray.add_argument("--cell-cpus", type=int, default=1,
                     help="CPUs each cell requests from Ray, and its torch threads (default 1)")
    ray.add_argument("--cell-memory", type=float, metavar="GB",
                     help="memory each cell requests from Ray, in GiB (default: none requested)")


def dry_run(args) -> int:
    """The memory model's table for the grid (and, with --compare, its error against records, with a
    warning when they were recorded by another commit)."""
    import sys

    from suite import memory_model
    from suite.config import expand_cells, load_config

    capacity = memory_model.parse_size(args.device_memory) if args.device_memory is not None else None
    from suite.models import refuse_missing_paths

    records = memory_model.read_records(args.compare) if args.compare else None
    config = load_config(args.config)
    refuse_missing_paths(config["models"], args.config)  # a hub id it cannot reach stays a "shapes unknown" row
    cells = expand_cells(config)
    table, misfits, unknown = memory_model.dry_run_table(cells, capacity)
    print(table)
    print(f"{len(cells)} cells; {misfits} will not fit" + ("" if args.device_memory is None
                                                            else f" in {args.device_memory}")
          + (f"; {unknown} of unknown shapes" if unknown else ""))
    if records is not None:
        table, worst = memory_model.compare_table(cells, records)
        warning = memory_model.commit_warning(cells, records, args.compare)
        if warning:
            print(warning, file=sys.stderr)
        print(f"\npredicted vs measured ({args.compare}):\n{table}")
        print("no recorded cell of this grid" if worst is None else f"largest |error|: {worst:.1f} %")
    return 0


def run(args) -> int:
    from suite.pruning.errors import UserError
    from suite.runner import run_grid

    if args.dry_run:
        return dry_run(args)
    given = [f"--{name.replace('_', '-')}" for name in ("device_memory", "compare") if getattr(args, name) is not None]
    if given:
        raise UserError(f"{', '.join(given)}: memory model options; add --dry-run")

    if args.backend == "ray":
        from suite.ray_backend import import_ray

        import_ray()  # without Ray: one line naming the extra, before anything is printed or written
        if args.jobs is not None:
            raise UserError("--jobs is the local backend's; on Ray as many cells run at once as the cluster's "
                            "CPUs (--cell-cpus each) and GPUs hold")
        if args.retries < 0 or args.cell_cpus < 1 or (args.cell_memory is not None and args.cell_memory <= 0):
            raise UserError("--retries must be >= 0, --cell-cpus >= 1 and --cell-memory > 0")
        return run_grid(args.config, out=args.out, force=args.force, quiet=args.quiet, repair=args.repair,
                        merge=args.merge, backend="ray", address=args.address, retries=args.retries, cell_cpus=args.cell_cpus,
                        memory_gb=args.cell_memory)
    given = [f"--{name.replace('_', '-')}" for name in ("address", "cell_memory") if getattr(args, name) is not None]
    if given:
        raise UserError(f"{', '.join(given)}: Ray backend options; add --backend ray")
    jobs = 1 if args.jobs is None else args.jobs
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    return run_grid(args.config, out=args.out, force=args.force, quiet=args.quiet, repair=args.repair, jobs=jobs,
                    merge=args.merge)

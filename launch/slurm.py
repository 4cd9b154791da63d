"""Renders an sbatch script that runs one lrulm process per node on a SLURM GPU cluster.

    python launch/slurm.py --nodes 4 --gpus_per_node 8 --partition gpu \\
        --config configs/lm/tiny.py --workdir /shared/runs/lm

`srun` starts one task per node; each task drives all the GPUs of its node, and
`lrulm.distributed.initialize()` finds the others through jax's SLURM detection (SLURM_NTASKS,
SLURM_PROCID, SLURM_STEP_NODELIST; the coordinator is the first node). The script exports
JAX_LOCAL_DEVICE_IDS because that detection otherwise gives each task only one GPU. When a task
fails, `--kill-on-bad-exit` ends the others. SIGTERM arrives --signal_s seconds before the time
limit (and on preemption), the trainer saves and exits 0, and with --requeue SLURM restarts the
job, which resumes from the same workdir (on a filesystem every node shares). --dry_run prints
the script; otherwise it is piped to `sbatch`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import common


def sbatch_script(args: argparse.Namespace, command: list[str], env: dict[str, str]) -> str:
    """The sbatch script text.

    Args:
      args: Parsed flags (nodes, gpus_per_node, job_name, time, partition, ...).
      command: The command every task runs.
      env: Extra environment variables exported before `srun`.

    Returns:
      The script, starting with `#!/bin/bash`.
    """
    directives = {
        "job-name": args.job_name,
        "nodes": args.nodes,
        "ntasks-per-node": 1,
        "gpus-per-node": args.gpus_per_node,
        "cpus-per-task": args.cpus_per_task,
        "time": args.time,
        "output": args.output,
        # Without "B:", SLURM signals the job steps (the trainers), not the batch shell.
        "signal": f"TERM@{args.signal_s}",
        "partition": args.partition,
        "account": args.account,
    }
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={v}" for k, v in directives.items() if v is not None]
    if args.requeue:
        lines.append("#SBATCH --requeue")
    lines += ["", "set -eo pipefail", ""]
    lines += list(args.setup or [])
    lines.append(
        "# One process per node owns every GPU of its node (jax's SLURM detection would give it "
        "only GPU $SLURM_LOCALID)."
    )
    device_ids = ",".join(str(i) for i in range(args.gpus_per_node))
    lines.append(f"export JAX_LOCAL_DEVICE_IDS={device_ids}")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += ["", f"srun --kill-on-bad-exit=1 {shlex.join(command)}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    own, command = common.split_command(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--cpus_per_task", type=int, default=None)
    parser.add_argument("--job_name", default="lrulm")
    parser.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--output", default="%x-%j.out", help="log file pattern")
    parser.add_argument(
        "--signal_s", type=int, default=300, help="SIGTERM this long before the time limit"
    )
    parser.add_argument("--requeue", action="store_true", help="requeue after preemption")
    parser.add_argument(
        "--setup",
        action="append",
        help="shell line run before srun, e.g. 'source venv/bin/activate'",
    )
    parser.add_argument("--env", action="append", help="KEY=VALUE exported (repeatable)")
    parser.add_argument("--config", help="for the default command: lrulm train --config ...")
    parser.add_argument("--workdir", help="for the default command; on a shared filesystem")
    parser.add_argument("--dry_run", action="store_true", help="print the script only")
    args = parser.parse_args(own)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus_per_node must be at least 1")
    command = common.resolve_command(command, args.config, args.workdir)
    script = sbatch_script(args, command, common.parse_env(args.env))
    if args.dry_run:
        print(script, end="")
        return
    common.Runner(dry_run=False)(["sbatch"], stdin=script)


if __name__ == "__main__":
    main()

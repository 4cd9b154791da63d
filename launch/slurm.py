"""Renders an sbatch script that runs one lrulm process per node on a SLURM GPU cluster.

    python launch/slurm.py --nodes 4 --gpus_per_node 8 --partition gpu \\
        --config configs/lm/tiny.py --workdir /shared/runs/lm

`srun` starts one task per node; each task drives all the GPUs of its node, and
`lrulm.distributed.initialize()` finds the others through jax's SLURM detection (SLURM_NTASKS,
SLURM_PROCID, SLURM_STEP_NODELIST; the coordinator is the first node). The script exports
JAX_LOCAL_DEVICE_IDS because that detection otherwise gives each task only one GPU. When a task
fails, `--kill-on-bad-exit` ends the others. SIGTERM arrives --signal_s seconds before the time
limit (and on preemption), and the trainer saves and exits 75 (lrulm.preemption). SLURM requeues
a --requeue job by itself only after a preemption or a node failure, not at its time limit, so
with --requeue the script itself requeues the job after the trainers have stopped for the time
limit: it runs srun in the background and, on the USR1 SLURM sends it --signal_s seconds before
the limit, sends the tasks SIGTERM (`scancel --signal=TERM`), waits for them to save and exit
75, and calls `scontrol requeue`. The requeued job resumes from the same workdir (on a
filesystem every node shares) and appends to the same log. --dry_run prints the script;
otherwise it is piped to `sbatch`.
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
        # Without "B:", SLURM signals the job steps (the trainers), not the batch shell; with
        # --requeue the batch shell takes the signal, stops the trainers and requeues the job.
        "signal": f"B:USR1@{args.signal_s}" if args.requeue else f"TERM@{args.signal_s}",
        "partition": args.partition,
        "account": args.account,
    }
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={v}" for k, v in directives.items() if v is not None]
    if args.requeue:
        # A requeued job writes the same log file: keep the earlier runs' lines.
        lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
    lines += ["", "set -eo pipefail", ""]
    lines += list(args.setup or [])
    lines.append(
        "# One process per node owns every GPU of its node (jax's SLURM detection would give it "
        "only GPU $SLURM_LOCALID)."
    )
    device_ids = ",".join(str(i) for i in range(args.gpus_per_node))
    lines.append(f"export JAX_LOCAL_DEVICE_IDS={device_ids}")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    # Since SLURM 22.05 srun does not inherit sbatch's --cpus-per-task: without it here the
    # trainer (and its data threads) would be bound to one core.
    cpus = f" --cpus-per-task={args.cpus_per_task}" if args.cpus_per_task else ""
    srun = f"srun --kill-on-bad-exit=1{cpus} {shlex.join(command)}"
    if args.requeue:
        srun = _REQUEUE.format(srun=srun, preempted=common.PREEMPTED_EXIT_CODE)
    lines += ["", *srun.splitlines(), ""]
    return "\n".join(lines)


# SLURM requeues a --requeue job after a preemption or a node failure, never at its time limit:
# a job whose trainers saved and stopped there would just end. So the batch shell takes the
# time-limit signal (USR1, --signal=B:...), has SLURM send SIGTERM to every task (scancel
# --signal signals the steps, not this shell; a SIGTERM to srun itself would make it SIGKILL
# the tasks), and once they have saved and stopped, requeues the job: the trainers exit 75
# (lrulm.preemption), or a signal's code where --kill-on-bad-exit ended the last ones after
# the first had exited (every process has saved before any exits). `wait` returns early when
# a trapped signal arrives, hence the loop until srun has really exited.
_REQUEUE = """\
time_limit=
trap 'time_limit=1; scancel --signal=TERM "$SLURM_JOB_ID" || true' USR1
{srun} &
srun_pid=$!
until wait "$srun_pid"; status=$?; [ "$status" -lt 128 ] || ! kill -0 "$srun_pid" 2>/dev/null
do :; done
if [ -n "$time_limit" ] && {{ [ "$status" -eq {preempted} ] || [ "$status" -gt 128 ]; }}; then
  echo "lrulm: stopped for the time limit; requeueing job $SLURM_JOB_ID to resume" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
"""


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

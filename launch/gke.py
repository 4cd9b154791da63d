"""Renders a Kubernetes JobSet for one TPU slice on GKE and applies it (or prints the xpk command).

    python launch/gke.py --name lru --image us-docker.pkg.dev/my-proj/lrulm:latest \\
        --accelerator_type v5p-128 --config configs/lm/tiny.py --workdir /gcs/bucket/runs/lm

One pod per TPU VM host (parallelism = completions = hosts), each requesting all the chips of its
host (`google.com/tpu`) on a node pool selected by `cloud.google.com/gke-tpu-accelerator` and
`cloud.google.com/gke-tpu-topology`. GKE gives every pod TPU_WORKER_ID / TPU_WORKER_HOSTNAMES,
from which `lrulm.distributed.initialize()` finds the other processes. On preemption the pods get
SIGTERM (the trainer saves and exits 75, lrulm.preemption: a failed pod, not a finished one)
and JobSet restarts the whole slice, without counting it against --max_restarts (which bounds
restarts after real failures; --count_preemptions counts both, for JobSet < 0.6); the
restarted command resumes from the shared workdir. --dry_run prints the manifest;
--print_xpk prints the equivalent `xpk workload create` command; otherwise `kubectl apply -f -`.

The pods share only the volumes mounted in them, so the workdir must be on one: every bucket
that a /gcs/BUCKET/... path in the command or an --env value names (or --gcs_bucket) is
mounted there with the GKE Cloud Storage FUSE CSI driver (enabled on the cluster;
--service_account names a Kubernetes service account allowed to use the bucket through Workload
Identity; pods on host networking, as here, need a GKE version whose driver supports them),
and --pvc CLAIM:/path mounts a PersistentVolumeClaim (Filestore, NFS). A multi-host run with
its workdir on no mount is refused.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys

import common  # first: puts the checkout on sys.path for lrulm

from lrulm.topologies import TpuSlice, tpu_slice

# Ports of the TPU runtime (8471), its health checks (8080) and jax's coordinator on TPU (8482).
PORTS = (8471, 8080, 8482)


def jobset(
    name: str,
    slice_: TpuSlice,
    *,
    image: str,
    command: list[str],
    env: dict[str, str],
    namespace: str = "default",
    max_restarts: int = 3,
    count_preemptions: bool = False,
    termination_grace_s: int = 120,
    gcs_buckets: list[str] = (),
    claims: dict[str, str] | None = None,
    service_account: str | None = None,
) -> dict:
    """The JobSet manifest as a dict (one replicated job of `slice_.hosts` pods).

    Args:
      name: JobSet name (also the prefix of the pod names).
      slice_: The TPU slice, from `lrulm.topologies.tpu_slice`.
      image: Container image with lrulm installed.
      command: The command every pod runs.
      env: Extra environment variables of the container.
      namespace: Kubernetes namespace.
      max_restarts: Whole-slice restarts after a failure (and after a preemption when
        count_preemptions).
      count_preemptions: Count preemptions against max_restarts too. By default a pod that
        stopped for a preemption (exit 75, or evicted: condition DisruptionTarget) fails
        its Job through a pod failure policy, and a JobSet rule restarts the slice for
        that without counting it (JobSet >= 0.6); True leaves the rules out (older JobSet).
      termination_grace_s: Seconds between SIGTERM and SIGKILL: time for the final checkpoint.
      gcs_buckets: Buckets mounted at /gcs/BUCKET in every pod (GCS FUSE CSI driver).
      claims: {PersistentVolumeClaim: mount path} (e.g. Filestore), mounted in every pod.
      service_account: The pods' Kubernetes service account (Workload Identity: the one
        allowed to read and write the buckets).

    Returns:
      The manifest, ready to serialise.
    """
    container = {
        "name": "lrulm",
        "image": image,
        "command": command,
        # Unbuffered output so `kubectl logs` shows progress as it happens.
        "env": [{"name": k, "value": v} for k, v in {"PYTHONUNBUFFERED": "1", **env}.items()],
        "ports": [{"containerPort": p} for p in PORTS],
        "resources": {
            "requests": {"google.com/tpu": slice_.chips_per_host},
            "limits": {"google.com/tpu": slice_.chips_per_host},
        },
    }
    volumes, mounts = [], []
    for i, bucket in enumerate(gcs_buckets):
        volumes.append(
            {
                "name": f"gcs-{i}",
                "csi": {
                    "driver": "gcsfuse.csi.storage.gke.io",
                    "volumeAttributes": {"bucketName": bucket, "mountOptions": "implicit-dirs"},
                },
            }
        )
        mounts.append({"name": f"gcs-{i}", "mountPath": f"/gcs/{bucket}"})
    for i, (claim, path) in enumerate((claims or {}).items()):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{i}", "mountPath": path})
    if mounts:
        container["volumeMounts"] = mounts
    pod = {
        "restartPolicy": "Never",
        # Host networking: the TPU runtime's cross-host traffic skips the pod network.
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "terminationGracePeriodSeconds": termination_grace_s,
        "nodeSelector": {
            "cloud.google.com/gke-tpu-accelerator": slice_.gke_accelerator,
            "cloud.google.com/gke-tpu-topology": slice_.topology,
        },
        "containers": [container],
    }
    if volumes:
        pod["volumes"] = volumes
    if service_account:
        pod["serviceAccountName"] = service_account
    pod_template = {"spec": pod}
    if gcs_buckets:  # the GCS FUSE CSI driver's webhook adds its sidecar to annotated pods
        pod_template = {"metadata": {"annotations": {"gke-gcsfuse/volumes": "true"}}, "spec": pod}
    job = {
        "parallelism": slice_.hosts,
        "completions": slice_.hosts,
        "backoffLimit": 0,
        "template": pod_template,
    }
    failure_policy = {"maxRestarts": max_restarts}
    if not count_preemptions:
        # A preempted pod fails its Job with reason PodFailurePolicy (not BackoffLimitExceeded,
        # as a crash does), and that reason restarts the slice without using up max_restarts:
        # spot capacity can be reclaimed any number of times, a bug should not loop forever.
        # DisruptionTarget covers a trainer killed before it saved (a spot VM gives ~30 s);
        # kubelet also sets it for node-pressure evictions, so a host memory leak that gets
        # pods evicted restarts without limit too (each restart resumes from a checkpoint).
        job["podFailurePolicy"] = {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": container["name"],
                        "operator": "In",
                        "values": [common.PREEMPTED_EXIT_CODE],
                    },
                },
                {
                    "action": "FailJob",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        }
        failure_policy["rules"] = [
            {
                "name": "preemption",
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
            }
        ]
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            "namespace": namespace,
            # One slice per node pool: all pods of the job land on the same ICI-connected hosts.
            "annotations": {
                "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
            },
        },
        "spec": {
            "failurePolicy": failure_policy,
            "replicatedJobs": [{"name": "slice", "replicas": 1, "template": {"spec": job}}],
        },
    }


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists and scalars; strings are JSON-quoted (valid YAML)."""
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, dict | list) and item:
                # The first line of the nested block goes after "- ".
                block = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {block[indent + 2 :]}")
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        return "\n".join(lines)
    return pad + _scalar(value)


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if value == {} or value == []:
        return json.dumps(value)
    return json.dumps(str(value))


def xpk_command(args: argparse.Namespace, slice_: TpuSlice, command: list[str]) -> list[str]:
    """The equivalent `xpk workload create` invocation."""
    xpk = ["xpk", "workload", "create", "--cluster", args.cluster or "CLUSTER"]
    xpk += ["--workload", args.name, "--tpu-type", slice_.accelerator_type, "--num-slices", "1"]
    xpk += ["--docker-image", args.image, "--max-restarts", str(args.max_restarts)]
    # xpk restarts on 42 and 127-255 only; without this a preempted run (75) would end.
    xpk += ["--restart-on-exit-codes", str(common.PREEMPTED_EXIT_CODE)]
    xpk += ["--termination-grace-period-seconds", str(args.termination_grace_s)]
    for key, value in common.parse_env(args.env).items():
        xpk += ["--env", f"{key}={value}"]
    if args.project:
        xpk += ["--project", args.project]
    if args.zone:
        xpk += ["--zone", args.zone]
    return [*xpk, "--command", shlex.join(command)]


def buckets_in(command: list[str]) -> list[str]:
    """The buckets that /gcs/BUCKET/... paths anywhere in the command name, in order."""
    found: list[str] = []
    for arg in command:
        for bucket in re.findall(r"(?:^|[=,:])/gcs/([a-z0-9][a-z0-9._-]*[a-z0-9])(?=/|$|,)", arg):
            if bucket not in found:
                found.append(bucket)
    return found


def parse_claims(pairs: list[str] | None) -> dict[str, str]:
    """`["CLAIM:/mount/path", ...]` from repeated --pvc flags, as a dict."""
    claims = {}
    for pair in pairs or []:
        claim, sep, path = pair.partition(":")
        if not sep or not claim or not path.startswith("/"):
            sys.exit(f"error: --pvc {pair!r} is not CLAIM:/mount/path")
        claims[claim] = path
    return claims


def check_workdir_mounted(command: list[str], mounts: list[str], hosts: int) -> None:
    """A pod's own filesystem is gone when it ends and seen by no other pod: the workdir
    must be on a volume the JobSet mounts (an error on several hosts, a warning on one)."""
    workdir = common.workdir_of(command)
    if workdir is None or any(
        workdir == m or workdir.startswith(m.rstrip("/") + "/") for m in mounts
    ):
        return
    message = (
        f"--workdir {workdir} is on no mounted volume ({', '.join(mounts) or 'none'}): each "
        "pod would write its own copy, lost when the pod ends, and a restart could not resume. "
        "Use /gcs/BUCKET/... (mounted with GCS FUSE) or a --pvc CLAIM:/path mount"
    )
    if hosts > 1:
        sys.exit(f"error: {message}")
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    own, command = common.split_command(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True, help="JobSet / xpk workload name")
    parser.add_argument("--image", required=True, help="container image with lrulm installed")
    parser.add_argument("--accelerator_type", required=True, help="e.g. v5p-128, v6e-64")
    parser.add_argument("--topology", help="chip arrangement when not the default, e.g. 4x4x12")
    parser.add_argument("--namespace", default="default")
    parser.add_argument(
        "--max_restarts",
        type=int,
        default=3,
        help="restarts after a failure (preemptions restart without counting); they resume",
    )
    parser.add_argument(
        "--count_preemptions",
        action="store_true",
        help="count preemptions against --max_restarts too: leaves out the JobSet failure "
        "rules, which need JobSet >= 0.6",
    )
    parser.add_argument("--termination_grace_s", type=int, default=120, help="time to save")
    parser.add_argument("--env", action="append", help="KEY=VALUE in the container (repeatable)")
    parser.add_argument("--config", help="for the default command: lrulm train --config ...")
    parser.add_argument(
        "--workdir", help="for the default command; a shared mount, e.g. /gcs/BUCKET/run"
    )
    parser.add_argument(
        "--gcs_bucket",
        action="append",
        default=[],
        help="mount gs://BUCKET at /gcs/BUCKET in every pod (repeatable; buckets named by "
        "/gcs/BUCKET/... paths in the command are mounted without it)",
    )
    parser.add_argument(
        "--pvc", action="append", help="CLAIM:/mount/path, a PersistentVolumeClaim (repeatable)"
    )
    parser.add_argument("--service_account", help="the pods' Kubernetes service account")
    parser.add_argument("--cluster", help="GKE cluster name, for --print_xpk")
    parser.add_argument("--project", help="for --print_xpk")
    parser.add_argument("--zone", help="for --print_xpk")
    parser.add_argument("--print_xpk", action="store_true", help="print the xpk command only")
    parser.add_argument("--dry_run", action="store_true", help="print the manifest only")
    args = parser.parse_args(own)
    command = common.resolve_command(command, args.config, args.workdir)
    try:
        slice_ = tpu_slice(args.accelerator_type, args.topology)
    except ValueError as e:
        parser.error(str(e))
    env = common.parse_env(args.env)
    # e.g. --env JAX_COMPILATION_CACHE_DIR=/gcs/BUCKET/xla-cache: mounted like the command's
    buckets = list(
        dict.fromkeys([*args.gcs_bucket, *buckets_in(command), *buckets_in(list(env.values()))])
    )
    claims = parse_claims(args.pvc)
    if args.print_xpk:
        if args.topology:
            parser.error(
                "--topology has no `xpk workload create` equivalent (xpk takes the shape "
                "from --tpu-type and the cluster's node pools): leave it out with --print_xpk, "
                "or apply the JobSet instead"
            )
        dropped = [
            flag
            for flag, given in (
                ("--namespace", args.namespace != "default"),
                ("--service_account", args.service_account),
                ("--count_preemptions", args.count_preemptions),
            )
            if given
        ]
        if dropped:
            print(f"note: {', '.join(dropped)} not passed on to xpk", file=sys.stderr)
        print(shlex.join(xpk_command(args, slice_, command)))
        if buckets or claims:
            print(
                "note: the pods need "
                + ", ".join([*(f"gs://{b} at /gcs/{b}" for b in buckets), *claims.values()])
                + " mounted: attach them to the cluster with xpk's storage commands",
                file=sys.stderr,
            )
        return
    check_workdir_mounted(
        command, [*(f"/gcs/{b}" for b in buckets), *claims.values()], slice_.hosts
    )
    manifest = jobset(
        args.name,
        slice_,
        image=args.image,
        command=command,
        env=env,
        namespace=args.namespace,
        max_restarts=args.max_restarts,
        count_preemptions=args.count_preemptions,
        termination_grace_s=args.termination_grace_s,
        gcs_buckets=buckets,
        claims=claims,
        service_account=args.service_account,
    )
    text = (
        f"# {slice_.accelerator_type}: {slice_.hosts} pods x {slice_.chips_per_host} chips, "
        f"topology {slice_.topology}, node pool machine type {slice_.machine_type}\n"
        f"{to_yaml(manifest)}\n"
    )
    if args.dry_run:
        print(text, end="")
        return
    common.Runner(dry_run=False)(["kubectl", "apply", "-f", "-"], stdin=text)


if __name__ == "__main__":
    main()

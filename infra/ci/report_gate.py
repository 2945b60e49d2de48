"""Report a retrain in its GitHub Actions run: the outcome and the registry's
decision in the run summary ($GITHUB_STEP_SUMMARY), and annotations that show
on the run page: an error for a failed job, a warning when the model trained
fine but was not promoted (an error, and exit 1, with --fail-if-not-promoted).

The retrain workflow's Report step (infra/ci/retrain.yml), on the runner:

    python infra/ci/report_gate.py --job-id "$SUBMISSION_ID-train" --run-output "$RUN_OUTPUT"

reads the job's exit code and last verdict line from the Ray cluster
(RAY_ADDRESS) and the run's summary.json with the AWS CLI. From facts already
at hand (no cluster, no AWS), e.g. to check a summary.json by hand:

    python infra/ci/report_gate.py --exit-code 0 --summary summary.json --fail-if-not-promoted

Exit status: the job's exit code (0 success, 1 failed while running, 2 usage or
configuration error, 3 quality gate not met), or 1 when the job succeeded but
its version was not promoted and --fail-if-not-promoted is given.
Standard library only (plus Ray's job client when reading from a cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from typing import Optional, Sequence

MEANING = {0: "succeeded", 1: "failed while running", 2: "usage or configuration error", 3: "quality gate not met"}
VERDICT_PREFIXES = ("quality gate:", "error:", "failed:")  # jobs/_cli.py's one-line outcomes


def escape(message: str) -> str:
    """A workflow command's message: %, CR and LF escaped as GitHub requires."""
    return message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def annotation(level: str, title: str, message: str) -> str:
    title = escape(title).replace(":", "%3A").replace(",", "%2C")
    return f"::{level} title={title}::{escape(message)}"


def registry_decision(summary: Optional[dict]) -> Optional[dict]:
    reg = (summary or {}).get("registry")
    return reg if isinstance(reg, dict) and "promoted" in reg else None


def report(code: int, summary: Optional[dict], *, verdict: str = "", job_id: str = "", status: str = "",
           run_output: str = "", fail_if_not_promoted: bool = False) -> tuple[list[str], list[str], int]:
    """(run summary lines in Markdown, annotations, exit status)."""
    reg = registry_decision(summary)
    not_promoted = code == 0 and reg is not None and not reg["promoted"]
    headline = MEANING.get(code, "failed")
    if code == 0 and reg is not None:
        headline = "trained, promoted to production" if reg["promoted"] else "trained, NOT promoted"
    lines = [f"## Retrain: {headline} (exit code {code})", ""]
    if not_promoted:
        lines += [f"> [!WARNING]\n> Version `{reg.get('version')}` of `{reg.get('name')}` was **not promoted**: "
                  f"{reg.get('reason')}. Production stays `{reg.get('production')}`.", ""]
    if job_id:
        lines.append(f"- Ray job: `{job_id}`" + (f" ({status})" if status else ""))
    if run_output:
        lines.append(f"- run directory: `{run_output}`")
    if verdict:
        lines.append(f"- `{verdict}`")
    if summary:
        m = summary.get("metrics") or {}
        lines.append(f"- validation accuracy {m.get('accuracy')}, top-{m.get('top_k')} {m.get('top_k_accuracy')}, "
                     f"macro F1 {m.get('macro_f1')} ({m.get('examples')} images); "
                     f"min_val_accuracy {summary.get('min_val_accuracy')}")
        if reg is not None:
            lines.append(f"- registry `{reg.get('registry')}#{reg.get('name')}`: version {reg.get('version')} "
                         f"(accuracy {reg.get('accuracy')} vs production {reg.get('production_accuracy')}) "
                         f"{'promoted' if reg['promoted'] else 'not promoted'}: {reg.get('reason')}; "
                         f"production is now {reg.get('production')}")
        lines += ["", "<details><summary>summary.json</summary>", "", "```json",
                  json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2), "```", "</details>"]
    else:
        lines.append("- no summary.json (the job stopped before writing it)")

    notes = []
    exit_status = code
    if code == 3:
        notes.append(annotation("error", "Quality gate not met", verdict or "see the run summary"))
    elif code == 2:
        notes.append(annotation("error", "Configuration error", verdict or "see the job log"))
    elif code != 0:
        notes.append(annotation("error", f"Training failed (exit {code})", verdict or "see the job log"))
    elif not_promoted:
        message = (f"{reg.get('name')} version {reg.get('version')} was not promoted: {reg.get('reason')} "
                   f"(production stays {reg.get('production')})")
        if fail_if_not_promoted:
            notes.append(annotation("error", "Not promoted", message))
            exit_status = 1
        else:
            notes.append(annotation("warning", "Not promoted", message))
    elif reg is not None:
        notes.append(annotation("notice", "Promoted", f"{reg.get('name')} version {reg.get('version')} "
                                                      f"is now production: {reg.get('reason')}"))
    elif summary is None:
        notes.append(annotation("warning", "No summary.json", f"no summary.json under {run_output or 'the run'}"))
    return lines, notes, exit_status


def facts_from_cluster(job_id: str, run_output: str) -> tuple[int, str, str, Optional[dict]]:
    """(exit code, job status, verdict line, summary) of a submitted Ray job."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(os.environ["RAY_ADDRESS"])
    info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    if code is None:
        found = re.search(r"exit code (\d+)", info.message or "")
        code = int(found.group(1)) if found else (0 if str(info.status) == "SUCCEEDED" else 1)
    verdict = ""
    for line in client.get_job_logs(job_id).splitlines()[-200:]:
        if line.startswith(VERDICT_PREFIXES):
            verdict = line
    summary = None
    try:  # the AWS CLI comes with GitHub's Ubuntu runners
        fetched = subprocess.run(["aws", "s3", "cp", f"{run_output.rstrip('/')}/summary.json", "-"],
                                 capture_output=True, text=True, timeout=300)
        if fetched.returncode == 0 and fetched.stdout:
            summary = json.loads(fetched.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return int(code), str(info.status), verdict, summary


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="report_gate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-id", default="", help="the Ray job's submission id (read from RAY_ADDRESS)")
    parser.add_argument("--run-output", default="", help="the run directory holding summary.json")
    parser.add_argument("--exit-code", type=int, help="the job's exit code, instead of asking the cluster")
    parser.add_argument("--summary", metavar="FILE", help="a local summary.json, with --exit-code")
    parser.add_argument("--verdict", default="", help="the job's one-line verdict, with --exit-code")
    parser.add_argument("--fail-if-not-promoted", action="store_true",
                        help="exit 1, with an error annotation, when the run trained but was not promoted")
    args = parser.parse_args(argv)

    status = ""
    if args.exit_code is not None:
        code, verdict = args.exit_code, args.verdict
        summary = None
        if args.summary:
            try:
                with open(args.summary) as f:
                    summary = json.load(f)
            except FileNotFoundError:
                summary = None
    elif args.job_id:
        try:
            code, status, verdict, summary = facts_from_cluster(args.job_id, args.run_output)
        except Exception as exc:  # noqa: BLE001 - never submitted: cluster unreachable, auth refused, ...
            print(annotation("error", "Job not submitted", f"{args.job_id}: {exc}"))
            return 1
    else:
        parser.error("give --job-id (read from the cluster) or --exit-code")

    lines, notes, exit_status = report(code, summary, verdict=verdict, job_id=args.job_id, status=status,
                                       run_output=args.run_output, fail_if_not_promoted=args.fail_if_not_promoted)
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        with open(target, "a") as out:
            out.write("\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    for note in notes:
        print(note)
    return exit_status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

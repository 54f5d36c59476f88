#!/bin/bash
# CRI conformance gate: runs critest (cri-tools v1.26.1, ../shared/conformance/critest/run.sh) against
# containerd with the runc handler, then with the ember handler, and fails when a spec passes on runc
# but not on ember. scripts/test.sh runs it before pytest. Takes ~7 min on 2 cores (runc ~1.5, ember ~5.5).
#
# Prints run.sh's own output, then one summary line per handler and the specs that pass on runc and
# fail on ember (with the first line of each failure). Exit status: 0 when ember passes every spec runc
# passes (or when the gate is skipped), 1 otherwise.
#
# Skipped (message, exit 0) when not run as root or when the conformance folder is missing, unless
# EMBER_CRITEST_REQUIRED=1 (then exit 1).
#
# Environment:
#   EMBER_CONFORMANCE_DIR   the shared conformance folder (default: ../shared/conformance beside the repo)
#   EMBER_CRITEST_REQUIRED  1: a missing conformance folder or a non-root user is a failure, not a skip
#   CRITEST_WORK            run.sh's work dir, one for both handlers (reports are per handler:
#                           report/runc.json, report/ember.json); default /var/tmp/ember-critest
#   CRITEST_TIMEOUT         seconds before one critest run is killed (default here 1200)
#   CRITEST_SUBNET, CRITEST_RUNTIME_CONFIG are passed to run.sh unchanged.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONF="${EMBER_CONFORMANCE_DIR:-$REPO/../shared/conformance}"
RUN_SH="$CONF/critest/run.sh"
export CRITEST_WORK="${CRITEST_WORK:-/var/tmp/ember-critest}"
export CRITEST_TIMEOUT="${CRITEST_TIMEOUT:-1200}"
REPORT="$CRITEST_WORK/report"

not_run() {
  if [ "${EMBER_CRITEST_REQUIRED:-0}" = 1 ]; then
    echo "critest gate: FAILED: $1 (EMBER_CRITEST_REQUIRED=1)" >&2
    exit 1
  fi
  echo "critest gate: skipped: $1 (set EMBER_CRITEST_REQUIRED=1 to make this a failure)"
  exit 0
}
[ "$(id -u)" = 0 ] || not_run "needs root (containerd, CNI, VMs)"
[ -d "$CONF" ] || not_run "no conformance folder $CONF (EMBER_CONFORMANCE_DIR)"
[ -x "$RUN_SH" ] || not_run "$RUN_SH is missing or not executable"

# --ginkgo.skip, every handler: specs that cannot pass here for either runtime.
SKIP_ALL=(
  # pulls gcr.io/k8s-staging-cri-tools/test-image-digest by a fixed digest: offline, no stand-in image
  # can have that digest (fails on runc too; see the conformance README's baseline)
  'public image with digest'
)
# --ginkgo.skip, ember only: what Ember refuses by design (issue 10, point 5: RunPodSandbox or
# CreateContainer fails at once with a one-line reason). A skipped spec here never counts as a failure.
SKIP_EMBER=(
  # hostNetwork: the pod's network stack is the guest kernel's; the host's cannot be shared into a VM
  'runtime should support HostNetwork is true'
  # hostPID: the host's processes are outside the VM; the guest cannot join the host PID namespace
  'runtime should support HostPID'
  # hostIPC: SysV IPC and POSIX shm live in the guest kernel; the host's IPC namespace cannot be shared
  'runtime should support HostIpc is true'
  # port-forward into a hostNetwork pod: needs hostNetwork, refused as above
  'portforward in host network'
  # rshared: mounts made in the container cannot propagate back to the host across the VM boundary
  "mount with 'rshared' should support propagation"
  # rslave: host mounts made after start cannot propagate into the guest (no filesystem sharing)
  "mount with 'rslave' should support propagation"
)
join() { local IFS='|'; echo "$*"; }
RE_RUNC="$(join "${SKIP_ALL[@]}")"
RE_EMBER="$(join "${SKIP_ALL[@]}" "${SKIP_EMBER[@]}")"
RE_EMBER_ONLY="$(join "${SKIP_EMBER[@]}")"

T0=$(date +%s)
declare -A START RC SECS
for h in runc ember; do
  if [ "$h" = runc ]; then re="$RE_RUNC"; else re="$RE_EMBER"; fi
  echo "critest gate: $RUN_SH $h, skipping: $re"
  START[$h]=$(date +%s)
  RC[$h]=0
  "$RUN_SH" "$h" "--ginkgo.skip=$re" || RC[$h]=$?
  SECS[$h]=$(( $(date +%s) - START[$h] ))
done

rc=0
python3 - "$REPORT" "$RE_EMBER_ONLY" \
    "${START[runc]}" "${RC[runc]}" "${SECS[runc]}" \
    "${START[ember]}" "${RC[ember]}" "${SECS[ember]}" "$(( $(date +%s) - T0 ))" <<'EOF' || rc=$?
import json, os, re, sys

report, ember_only = sys.argv[1], re.compile(sys.argv[2])
runs = {"runc": sys.argv[3:6], "ember": sys.argv[6:9]}
total = sys.argv[9]


def load(handler, start):
    """{spec name: state} and suite-level failures from this run's ginkgo JSON report, or None."""
    path = os.path.join(report, handler + ".json")
    try:
        if os.stat(path).st_mtime < int(start):
            return None, f"{path} is older than this run (run.sh did not reach critest)"
        with open(path) as f:
            suites = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"no report: {e}"
    specs, problems, messages = {}, [], {}
    for suite in suites:
        for r in suite.get("SpecReports") or []:
            state = r.get("State", "")
            if r.get("LeafNodeType") != "It":  # BeforeSuite, AfterSuite, ...: only a failure counts
                if state not in ("passed", "skipped"):
                    problems.append(f"[{r.get('LeafNodeType')}] {state}")
                continue
            name = " ".join((r.get("ContainerHierarchyTexts") or []) + [r.get("LeafNodeText") or ""]).strip()
            specs[name] = state
            lines = [x.strip() for x in ((r.get("Failure") or {}).get("Message") or "").splitlines() if x.strip()]
            if lines:  # the first line, and the next ones while it says little ("Expected", "Timed out ...")
                msg, rest = lines[0], lines[1:4]
                while len(msg) < 40 and rest:
                    msg += " " + rest.pop(0)
                messages[name] = msg[:240]
    return (specs, problems, messages), None


results = {}
for handler, (start, rc, secs) in runs.items():
    res, err = load(handler, start)
    results[handler] = res
    if res is None:
        print(f"critest gate: {handler}: {err} (run.sh exit status {rc}, {secs} s)")
        continue
    specs, problems, _ = res
    n = {s: sum(1 for v in specs.values() if v == s) for s in ("passed", "skipped")}
    failed = len(specs) - n["passed"] - n["skipped"]
    by_design = sum(1 for k, v in specs.items() if v == "skipped" and ember_only.search(k)) if handler == "ember" else 0
    extra = f" ({by_design} refused by design)" if by_design else ""
    suite = f", suite-level failures: {', '.join(problems)}" if problems else ""
    print(f"critest gate: {handler}: {n['passed']} passed, {failed} failed, {n['skipped']} skipped{extra}"
          f"{suite} (run.sh exit status {rc}, {secs} s)")

runc, ember = results["runc"], results["ember"]
if runc is None or not any(v == "passed" for v in runc[0].values()):
    print(f"critest gate: FAILED: no usable runc reference run (total {total} s)")
    sys.exit(1)
regressions = []
for name, state in runc[0].items():
    if state != "passed":
        continue
    got = ember[0].get(name, "missing") if ember else "no report"
    if got == "passed" or (got == "skipped" and ember_only.search(name)):
        continue
    regressions.append((name, got, ember[2].get(name, "") if ember else ""))
if not regressions:
    print(f"critest gate: ok: ember passes every spec runc passes (total {total} s)")
    sys.exit(0)
print(f"critest gate: {len(regressions)} spec(s) pass on runc and fail on ember:")
for name, got, msg in sorted(regressions):
    print(f"  {name}" + ("" if got == "failed" else f" ({got})"))
    if msg:
        print(f"      {msg}")
print(f"critest gate: FAILED (total {total} s; ember log: {os.path.join(report, 'ember.log')})")
sys.exit(1)
EOF
exit "$rc"

#!/usr/bin/env bash
# Runs the README's tour from the README itself: every fenced block whose info
# string is `sh tour`, in order, in one bash session (variables and background
# processes carry over, as in a terminal), stopping at the first command that
# fails (`set -euo pipefail`). It checks that each step's commands succeed,
# not what they print.
#
#   dataplane/tests/readme_tour.sh               # build (`sh tour-build` blocks), then the tour
#   FLASHSALE_BIN_DIR=dir readme_tour.sh         # use dir/flashsale; skip the build blocks
#   readme_tour.sh --free-ports                  # move the tour's ports 8080, 9090, 9091 to free ones
#
# Whatever the tour left running when it fails is stopped on exit.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

free_ports=0
for arg in "$@"; do
  case "$arg" in
    --free-ports) free_ports=1 ;;
    *) echo "usage: $0 [--free-ports]" >&2; exit 2 ;;
  esac
done
for tool in curl python3; do
  command -v "$tool" > /dev/null || { echo "the tour needs $tool: apt-get install -y $tool" >&2; exit 1; }
done

build=1
prelude=''
if [ -n "${FLASHSALE_BIN_DIR:-}" ]; then
  [ -x "$FLASHSALE_BIN_DIR/flashsale" ] || { echo "no flashsale in $FLASHSALE_BIN_DIR" >&2; exit 1; }
  build=0
  prelude="export PATH=\"$FLASHSALE_BIN_DIR:\$PATH\""
fi

# The blocks, each preceded by a line naming its step for the failure report.
program="$(awk -v build="$build" '
  /^```/ {
    if (fence) { fence = 0; keep = 0; next }
    fence = 1
    info = substr($0, 4)
    if (info == "sh tour" || (info == "sh tour-build" && build)) {
      keep = 1; step++
      printf "STEP=%d; echo \"--- tour step %d (README.md line %d)\" >&2\n", step, step, NR
    }
    next
  }
  fence && keep { print }
' README.md)"
[ -n "$program" ] || { echo "README.md has no sh tour blocks" >&2; exit 1; }

if [ "$free_ports" = 1 ]; then
  read -r p1 p2 p3 < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
  program="$(printf '%s\n' "$program" | sed -E "s/:8080([^0-9]|$)/:$p1\1/g; s/:9090([^0-9]|$)/:$p2\1/g; s/:9091([^0-9]|$)/:$p3\1/g")"
fi

script="$(mktemp)"
trap 'rm -f "$script"' EXIT
cat > "$script" <<TOUR
set -euo pipefail
STEP=0
trap 'echo "tour step \$STEP failed (exit \$?): \$BASH_COMMAND" >&2' ERR
# On any exit, stop what the tour started and did not stop itself.
trap 'left=\$(jobs -p); if [ -n "\$left" ]; then kill \$left 2> /dev/null || true; wait 2> /dev/null || true; fi' EXIT
$prelude
$program
echo "--- tour done: \$STEP steps" >&2
TOUR
bash "$script"

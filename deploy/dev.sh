#!/usr/bin/env bash
# Sets up a development machine (idempotent) and runs one pieceflow job:
#   bash deploy/dev.sh demo [ARGS...]   the main job: the live demo on the local stack
#   bash deploy/dev.sh test [ARGS...]   every test: unit, then integration against the real stack
#   bash deploy/dev.sh setup            only the set-up
# Set-up installs what is missing: Java and Maven (apt, as root), the system services the tests
# use, a virtualenv in .venv with pieceflow and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "missing: $* - install them (sudo apt-get install $*) and rerun" >&2
    exit 1
  fi
  echo "Installing $* with apt..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup() {
  local missing=()
  command -v java >/dev/null || missing+=(openjdk-17-jdk-headless)
  command -v mvn >/dev/null || missing+=(maven)
  command -v python3 >/dev/null || missing+=(python3 python3-venv)
  command -v promtool >/dev/null || missing+=(prometheus)
  # The ERP sink's tests run a private PostgreSQL cluster from the Debian server package.
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
  if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv..." >&2
    python3 -m venv .venv
  fi
  if ! .venv/bin/python -c "import streams, pytest" 2>/dev/null \
      || [ pyproject.toml -nt .venv/.pieceflow-installed ]; then
    echo "Installing pieceflow and its test extras into .venv..." >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    touch .venv/.pieceflow-installed
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec .venv/bin/pieceflow demo "$@" ;;
  test) setup; exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: bash deploy/dev.sh demo|test|setup [ARGS...]" >&2; exit 2 ;;
esac

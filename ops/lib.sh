# Shared by ops/ scripts: project root, the virtualenv, and starting this machine's services.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

ensure_venv() {
    # Installs the project and its dev tools into .venv from requirements-dev.lock (every dependency pinned with
    # its hashes: pip refuses anything else), then the project itself without dependencies; again only when the
    # lock or pyproject.toml changed. ops/lock writes the lock files.
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/requirements-dev.lock" | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        "$PY" -m pip install --quiet --require-hashes -r "$ROOT/requirements-dev.lock"
        "$PY" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

port_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
    local port=$1 name=$2
    for _ in $(seq 1 120); do
        port_answers "$port" && return 0
        sleep 0.5
    done
    echo "$name did not come up on 127.0.0.1:$port" >&2
    return 1
}

ensure_services() {
    # PostgreSQL, Redis and RabbitMQ answering, and CLEANLEDGER_*_URL exported for them: see ops/services.
    local exports
    exports=$("$ROOT/ops/services" start)
    eval "$exports"
}

install_packages() {
    # install_packages COMMAND PACKAGE...: the Debian packages, unless COMMAND (a name or a path) is there
    # already. As root only; anyone else is told what to install, and the script stops (exit 69).
    local command=$1
    shift
    if command -v "$command" >/dev/null || [ -x "$command" ]; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "$* missing: install it (apt-get install $*)" >&2
        exit 69
    fi
    echo "installing $*" >&2
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_nginx() {
    # nginx fronts the ingress nodes (ops/run) and the supervised-stack test (ops/test).
    install_packages nginx nginx
}

ensure_chromium() {
    # Headless Chromium loads the /docs page in the suite (every route must show there).
    install_packages chromium chromium
}

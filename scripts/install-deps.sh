#!/usr/bin/env bash
# Install what rampool needs on Debian 12 and build the project venv at .venv.
#
#   usage: bash scripts/install-deps.sh
#
# scripts/setup.sh and scripts/test.sh both start with this step. Every part checks
# before it acts, so a second run installs nothing and takes about a second:
#   1. Debian packages: apt-get runs only when dpkg-query reports one missing.
#   2. The venv: made from /usr/bin/python3 with --system-site-packages, so that
#      Debian's python3-libnbd (the `nbd` module) is importable from it, and so that
#      nbdkit's embedded Python 3.11 can load the venv's packages via PYTHONPATH.
#   3. pip install -e '.[test]': skipped while a stamp in .venv matches setup.cfg.
#   4. A check that imports the modules and runs the tools the project uses, from the
#      venv and from inside nbdkit, naming anything that is missing.
# Needs root (or sudo) only when Debian packages are missing.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$REPO/.venv"
SYSTEM_PYTHON=/usr/bin/python3
STAMP="$VENV/.rampool-install-stamp"

DEBIAN_PACKAGES=(
    nbdkit nbdkit-plugin-python # the plugin path: nbdkit running nbdplugin/
    python3-libnbd libnbd-bin   # libnbd: the `nbd` module, nbdinfo, nbdsh, nbdcopy
    nbd-client                  # the kernel path's NBD client
    qemu-utils                  # qemu-img, qemu-io, qemu-nbd: independent NBD peers
    fio                         # load and benchmarks through its nbd engine
    python3-venv python3-dev    # the venv; C headers for cffi
    iproute2                    # network namespaces for multi-host tests
    curl                        # the README's control API examples
    etcd-server                 # the cluster registry backend
    qemu-system-x86             # boots a real kernel for kernel-path tests
)

# Commands the tests and the demo run, and the package that provides each.
REQUIRED_COMMANDS=(
    nbdkit:nbdkit nbdinfo:libnbd-bin nbdsh:libnbd-bin nbdcopy:libnbd-bin
    nbd-client:nbd-client qemu-img:qemu-utils qemu-io:qemu-utils
    qemu-nbd:qemu-utils fio:fio ip:iproute2 etcd:etcd-server
    qemu-system-x86_64:qemu-system-x86 curl:curl
)

# Python modules the project imports, and where each comes from.
REQUIRED_MODULES=(
    "nbd:Debian package python3-libnbd"
    "cffi:pip (setup.cfg)" "aiohttp:pip (setup.cfg)"
    "prometheus_client:pip (setup.cfg)" "typer:pip (setup.cfg)"
    "rich:pip (setup.cfg)" "pytest:pip (extra 'test')" "pytest_cov:pip (extra 'test')"
    "pytest_timeout:pip (extra 'test')" "hypothesis:pip (extra 'test')"
)

log() { printf 'install-deps: %s\n' "$*"; }
die() {
    printf 'install-deps: ERROR: %s\n' "$*" >&2
    exit 1
}

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "installing Debian packages needs root: rerun as root or install sudo"
    fi
}

check_platform() {
    local id="" version=""
    if [[ -r /etc/os-release ]]; then
        id=$(. /etc/os-release && echo "${ID:-}")
        version=$(. /etc/os-release && echo "${VERSION_ID:-}")
    fi
    if [[ $id != debian || $version != 12 ]]; then
        log "WARNING: made for Debian 12; this is '${id:-unknown} ${version:-?}'," \
            "package names or versions may differ"
    fi
    command -v dpkg-query >/dev/null || die "dpkg-query not found: this needs Debian"
}

missing_packages() {
    local pkg status
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
        [[ $status == "ii "* ]] || printf '%s\n' "$pkg"
    done
}

install_debian_packages() {
    local missing etcd_was_missing=false
    mapfile -t missing < <(missing_packages)
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "Debian packages: all ${#DEBIAN_PACKAGES[@]} present"
        return
    fi
    [[ " ${missing[*]} " == *" etcd-server "* ]] && etcd_was_missing=true

    log "Debian packages: installing ${missing[*]}"
    # Recommends would pull in a desktop stack for qemu-system-x86 and nothing the
    # project uses; the lock timeout waits out unattended-upgrades on a fresh host.
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -q -o DPkg::Lock::Timeout=300 update
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends \
        "${missing[@]}"

    mapfile -t missing < <(missing_packages)
    if [[ ${#missing[@]} -ne 0 ]]; then
        die "apt-get finished but these packages are still not installed:" \
            "${missing[*]}; see the apt-get output above"
    fi

    # We only need the etcd binary: tests and the demo start their own etcd on
    # ports they choose. Debian's etcd-server enables etcd.service on install and,
    # on a host run by systemd, starts it; undo both rather than leave a daemon on
    # port 2379. Without systemd (containers) it was enabled but not started.
    if $etcd_was_missing; then
        if [[ -d /run/systemd/system ]]; then
            log "etcd: stopping and disabling etcd.service (started by its install)"
            as_root systemctl disable --now etcd.service ||
                log "WARNING: could not stop etcd.service; stop it by hand"
        elif command -v systemctl >/dev/null; then
            log "etcd: no systemd running, so etcd.service was not started;" \
                "disabling it for later boots"
            as_root systemctl disable etcd.service >/dev/null 2>&1 ||
                log "WARNING: could not disable etcd.service"
        fi
    fi
}

venv_problem() {
    # Prints why the venv cannot be used as is; prints nothing when it is fine.
    local cfg="$VENV/pyvenv.cfg"
    if [[ ! -e $VENV ]]; then
        echo "it does not exist"
    elif [[ ! -f $cfg || ! -x $VENV/bin/python ]]; then
        echo "it is incomplete (no pyvenv.cfg or bin/python)"
    elif ! grep -Eq '^home *= */usr/bin$' "$cfg"; then
        echo "it was not made from $SYSTEM_PYTHON ($(grep -E '^home' "$cfg" || true))"
    elif ! grep -Eq '^include-system-site-packages *= *true$' "$cfg"; then
        echo "it was made without --system-site-packages"
    elif ! "$VENV/bin/python" -c '' 2>/dev/null; then
        echo "its python does not start"
    fi
}

make_venv() {
    local problem
    problem=$(venv_problem)
    if [[ -z $problem ]]; then
        log "venv: $VENV is usable"
        return
    fi
    [[ -x $SYSTEM_PYTHON ]] || die "$SYSTEM_PYTHON not found: apt-get install python3"
    if [[ -e $VENV ]]; then
        log "venv: recreating $VENV because $problem"
        rm -rf "$VENV"
    else
        log "venv: creating $VENV"
    fi
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
}

wanted_stamp() {
    # The repo path is part of the key: an editable install points at it.
    printf '%s %s\n' "$(sha256sum "$REPO/setup.cfg" | cut -d' ' -f1)" "$REPO"
}

python_modules_missing() {
    # Prints one line "module: source" per module the venv cannot import.
    "$VENV/bin/python" - "${REQUIRED_MODULES[@]}" <<'EOF'
import importlib.util
import sys

for spec in sys.argv[1:]:
    name, source = spec.split(":", 1)
    if importlib.util.find_spec(name) is None:
        print(f"{name}: from {source}")
EOF
}

install_python_packages() {
    local wanted
    wanted=$(wanted_stamp)
    if [[ -f $STAMP && $(cat "$STAMP") == "$wanted" &&
        -z $(python_modules_missing) ]]; then
        log "python packages: up to date (setup.cfg unchanged since last install)"
        return
    fi
    log "python packages: pip install -e '.[test]'"
    rm -f "$STAMP"
    # Never add the PyPI project named `nbd`: it is an unrelated notebook tool and
    # would shadow libnbd's module from python3-libnbd.
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        "$VENV/bin/python" -m pip install --progress-bar off -e "$REPO[test]"
    printf '%s' "$wanted" >"$STAMP"
}

verify() {
    local problems=() entry cmd pkg missing_modules site probe out
    local python_broken=false

    for entry in "${REQUIRED_COMMANDS[@]}"; do
        cmd=${entry%%:*}
        pkg=${entry#*:}
        # nbd-client lives in /usr/sbin, which a non-root PATH may lack.
        PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null ||
            problems+=("command '$cmd' not found (Debian package $pkg)")
    done
    for cmd in ruff mypy pytest rampool; do
        [[ -x $VENV/bin/$cmd ]] ||
            problems+=("$VENV/bin/$cmd missing (pip install -e '.[test]')")
    done

    missing_modules=$(python_modules_missing)
    if [[ -n $missing_modules ]]; then
        while IFS= read -r entry; do
            problems+=("python module $entry is not importable from $VENV")
        done <<<"$missing_modules"
        python_broken=true
    fi
    if "$VENV/bin/python" -c 'import nbd; nbd.NBD' 2>/dev/null; then
        :
    elif [[ -z $missing_modules ]]; then
        problems+=("the 'nbd' module in $VENV is not libnbd's (was the PyPI \
package 'nbd' installed? run: $VENV/bin/pip uninstall nbd)")
        python_broken=true
    fi

    # nbdkit embeds Debian's libpython: prove it can load the venv's packages the
    # way nbdplugin will, by running a probe script under nbdkit itself.
    if command -v nbdkit >/dev/null; then
        site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
        probe=$(mktemp --suffix=.py)
        cat >"$probe" <<'EOF'
import sys

import aiohttp
import cffi
import nbd

# Everything that can fail runs at load time: nbdkit 1.32 reports an exception
# raised here, but crashes on one raised inside dump_plugin.
LIBNBD_VERSION = nbd.NBD().get_version()
API_VERSION = 2


def dump_plugin():
    print("probe_python=%d.%d" % sys.version_info[:2])
    print("probe_libnbd=%s" % LIBNBD_VERSION)


def open(readonly):
    return 1


def get_size(h):
    return 0


def pread(h, buf, offset, flags):
    pass
EOF
        if out=$(PYTHONPATH="$site" nbdkit python "$probe" --dump-plugin 2>&1) &&
            [[ $out == *probe_python=* ]]; then
            log "nbdkit python: $(grep -E '^(version|probe_python|probe_libnbd)=' \
                <<<"$out" | paste -sd' ')"
        else
            # Drop the key=value lines of --dump-plugin; what is left is the error.
            problems+=("nbdkit's python plugin (Debian package \
nbdkit-plugin-python) cannot load the venv's packages with PYTHONPATH=$site: \
$(grep -Ev '^[a-z0-9_]+=' <<<"$out" | tail -n 3 | paste -sd' ' | tr -s ' ')")
            python_broken=true
        fi
        rm -f "$probe"
    fi

    if [[ ${#problems[@]} -ne 0 ]]; then
        printf 'install-deps: ERROR: %s\n' "${problems[@]}" >&2
        # The next run must redo pip rather than trust the stamp.
        if $python_broken; then
            rm -f "$STAMP"
        fi
        die "${#problems[@]} problem(s) above; fix them and rerun" \
            "bash scripts/install-deps.sh"
    fi
    log "verified: Debian tools, venv modules, nbdkit python plugin"
}

main() {
    check_platform
    mkdir -p "$REPO/build"
    # setup.sh and test.sh may run at the same time; one installs, the other waits.
    exec 9>"$REPO/build/install-deps.lock"
    flock 9
    install_debian_packages
    make_venv
    install_python_packages
    verify
}

main "$@"

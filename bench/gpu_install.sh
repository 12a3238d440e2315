#!/usr/bin/env bash
# Offline install for the prepared GPU run (no network): the editable install
#   pip install --no-build-isolation --no-deps --no-index -e .
# and, where that fails (e.g. no `wheel` for setuptools' bdist_wheel), an in-place build of the
# C++ extension plus the latentr3_fast/kernels -> ../kernels link that an editable install
# provides. Then checks that the package, its C++ trie and its kernels import.
#   bench/gpu_install.sh          install
#   bench/gpu_install.sh --check  only report the build prerequisites (dry runs, CI)
set -uo pipefail
cd "$(dirname "$0")/.."
main() {
    local missing=()
    for mod in torch triton transformers pybind11 setuptools; do
        python -c "import $mod" 2>/dev/null || missing+=("$mod")
    done
    command -v cmake > /dev/null || python -c "import cmake" 2>/dev/null || missing+=(cmake)
    echo "build prerequisites missing: ${missing[*]:-none}"
    if [ "${1:-}" = "--check" ]; then
        echo "check only: would run pip install --no-build-isolation --no-deps --no-index -e ."
        python -c "import latentr3_fast.kernels.linear_logprob, latentr3_fast._C" \
            && echo "the package imports here"
        return $?
    fi
    if python -m pip install --no-build-isolation --no-deps --no-index -e .; then
        echo "installed: editable (pip)"
    else
        echo "pip editable install failed; falling back to setup.py build_ext --inplace"
        python setup.py build_ext --inplace || return 1
        [ -e latentr3_fast/kernels ] || ln -s ../kernels latentr3_fast/kernels
        echo "installed: in place (build_ext --inplace + kernels link)"
    fi
    python -c "import latentr3_fast._C, latentr3_fast.kernels.linear_logprob as k; print(k.__file__)"
}
main "$@"
exit $?

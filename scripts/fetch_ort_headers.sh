#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ API headers (not shipped in the onnxruntime pip wheel) from Debian's
# libonnxruntime-dev package and unpack them into DEST, so that DEST can be passed as ONNXRUNTIME_ROOT
# (DEST/include/onnxruntime_c_api.h, ...). The package is only downloaded and unpacked, never installed
# (installing it would pull Debian's own libonnxruntime runtime). apt runs with a private configuration:
# its own sources list (Debian trixie main: libonnxruntime-dev 1.21, API 21), lists and cache directories,
# so the system's apt state is not touched and no root is needed.
#
# It also links the onnxruntime pip wheel's libonnxruntime.so.1.* (of $PYTHON, default python3) into DEST/lib as
# libonnxruntime.so and libonnxruntime.so.1 (links only: nothing is written into site-packages), so that DEST is
# a complete ONNXRUNTIME_ROOT for the C++ example recipes/cpp/ort_recommend. The custom-op library itself
# needs only the headers.
#
#   bash scripts/fetch_ort_headers.sh DEST        # e.g. build/ort-root
#   env: M4R_ORT_DEB_SUITE (default trixie), M4R_ORT_DEB_MIRROR (default http://deb.debian.org/debian), PYTHON
set -euo pipefail

dest="${1:?usage: fetch_ort_headers.sh DEST}"
suite="${M4R_ORT_DEB_SUITE:-trixie}"
mirror="${M4R_ORT_DEB_MIRROR:-http://deb.debian.org/debian}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

link_wheel_library() {
  local py="${PYTHON:-python3}" lib
  lib="$("$py" -c 'import glob, os, onnxruntime; d = os.path.join(os.path.dirname(onnxruntime.__file__), "capi"); print((sorted(glob.glob(os.path.join(d, "libonnxruntime.so.1.*"))) or [""])[-1])' 2>/dev/null || true)"
  if [[ -z "$lib" ]]; then
    echo "note: $py has no onnxruntime wheel: DEST/lib not created (headers only)"
    return 0
  fi
  mkdir -p "$dest/lib"
  ln -sfn "$lib" "$dest/lib/libonnxruntime.so.1"
  ln -sfn "$lib" "$dest/lib/libonnxruntime.so"
  echo "linked $lib -> $dest/lib/libonnxruntime.so{,.1}"
}

if [[ -f "$dest/include/onnxruntime_c_api.h" ]]; then
  echo "ONNX Runtime headers already in $dest/include"
  link_wheel_library
  exit 0
fi
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (a Debian/Ubuntu machine is needed to fetch the headers; or pass ONNXRUNTIME_ROOT of an ONNX Runtime release)" >&2; exit 1; }
done
[[ -f "$keyring" ]] || { echo "error: $keyring not found (install debian-archive-keyring)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc/preferences.d" "$work/deb"
echo "deb [signed-by=$keyring] $mirror $suite main" > "$work/etc/sources.list"
: > "$work/status"
apt_opts=(
  -o "Dir::Etc::sourcelist=$work/etc/sources.list" -o "Dir::Etc::sourceparts=-"
  -o "Dir::Etc::preferencesparts=$work/etc/preferences.d"
  -o "Dir::State::Lists=$work/lists" -o "Dir::State::status=$work/status" -o "Dir::Cache=$work/cache"
  -o "APT::Architecture=$(dpkg --print-architecture)" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)"
)
apt-get "${apt_opts[@]}" -q update >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; exit 1; }
(cd "$work/deb" && apt-get "${apt_opts[@]}" -q download libonnxruntime-dev)
deb="$(ls "$work"/deb/libonnxruntime-dev_*.deb)"
dpkg-deb -x "$deb" "$work/x"
hdr="$(dirname "$(find "$work/x" -name onnxruntime_c_api.h | head -n 1)")"
[[ -f "$hdr/onnxruntime_c_api.h" ]] || { echo "error: no onnxruntime_c_api.h in $deb" >&2; exit 1; }
mkdir -p "$dest"
rm -rf "$dest/include.tmp" && cp -r "$hdr" "$dest/include.tmp" && mv "$dest/include.tmp" "$dest/include"
basename "$deb" > "$dest/SOURCE"
echo "ONNX Runtime headers from $(basename "$deb") -> $dest/include"
link_wheel_library

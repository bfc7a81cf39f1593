#!/bin/sh
# runtime-deps.sh PREFIX: makes the install tree PREFIX (PREFIX/bin/dtrain, from
# `cmake --install build --prefix PREFIX`) self-describing for a runtime image:
#
#   PREFIX/share/dtrain/runtime-packages.txt  the dpkg packages that own the shared
#       libraries the binary loads (ldd), plus openmpi-bin (mpirun) and fortunes +
#       fortunes-min (the text of `dtrain train --model gpt`), one a line
#   PREFIX/lib/  copies of the libraries that no package owns (a CUDA toolkit or a
#       library installed by hand); empty for a build from distribution packages
#
# The runtime stage of Dockerfile.cpu and Dockerfile.cuda installs that package list
# (nothing else: no compilers, no -dev packages) and puts PREFIX/lib on the loader's
# path, so the image holds exactly what `ldd dtrain` asks for. The podman test
# (tests/podman_image_test.sh) runs it on the suite's own build. Exits non-zero when
# ldd reports a library it cannot find. POSIX sh: runs in the build stages too.
set -eu
prefix=${1:?usage: runtime-deps.sh PREFIX}
bin="$prefix/bin/dtrain"
[ -x "$bin" ] || { echo "runtime-deps.sh: no executable $bin" >&2; exit 1; }
mkdir -p "$prefix/share/dtrain" "$prefix/lib"
list="$prefix/share/dtrain/runtime-packages.txt"
tmp="$list.tmp"
: > "$tmp"
if ldd "$bin" | grep -q 'not found'; then
  echo "runtime-deps.sh: $bin needs libraries that are not installed:" >&2
  ldd "$bin" | grep 'not found' >&2
  exit 1
fi
# "libfoo.so.1 => /path/libfoo.so.1 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u |
while read -r lib; do
  real=$(readlink -f "$lib")
  # dpkg records a file under the path its package ships (/lib or /usr/lib on a
  # merged-/usr system): try the path ldd printed, the resolved one and its /lib twin.
  pkg=""
  for p in "$lib" "$real" "$(printf '%s' "$real" | sed 's|^/usr/lib/|/lib/|')" \
           "$(printf '%s' "$lib" | sed 's|^/lib/|/usr/lib/|')"; do
    pkg=$(dpkg-query -S "$p" 2>/dev/null | grep -v '^diversion' | head -n1 | cut -d: -f1) || true
    [ -n "$pkg" ] && break
  done
  if [ -n "$pkg" ]; then
    echo "$pkg" >> "$tmp"
  else
    # A hard link where the file system allows (a CUDA toolkit is most of a GB).
    dest="$prefix/lib/$(basename "$lib")"
    ln -f "$real" "$dest" 2>/dev/null || cp -L "$lib" "$dest"
  fi
done
printf '%s\n' openmpi-bin fortunes fortunes-min >> "$tmp"
sort -u "$tmp" > "$list"
rm -f "$tmp"

# Shared by the tools/device/*.sh scripts (source it): pack binaries here for the GPU machine, unpack them there.
#
#   bundle_package DIR BIN...        here: BIN... and the shared libraries they need that the GPU machine lacks go
#                                    into DIR/bundle.tar.xz (git-ignored). Left behind: glibc, libstdc++, libgcc
#                                    (the device has newer ones), cuBLAS (540 MB; the device has its own) and NCCL
#                                    (217 MB; the device has torch's). xz, because the working tree that travels is
#                                    capped at 64 MiB.
#   bundle_unpack DIR [LIB_DIR...]   there: unpacks DIR/bundle.tar.xz into /tmp/petrel-bundle-<name of DIR> (or uses
#                                    DIR itself when it holds bin/ and no bundle), sets BUNDLE_ROOT to that folder and
#                                    BUNDLE_BIN to its bin/, and puts the bundle's libraries, the device's cuBLAS and every LIB_DIR on
#                                    LD_LIBRARY_PATH. Returns 1 when there is nothing to unpack.

bundle_package() {
  local dir=$1 lib
  shift
  rm -rf "$dir" && mkdir -p "$dir/bin" "$dir/lib"
  cp "$@" "$dir/bin/" || return 1
  for lib in $(ldd "$@" | awk '/=>/ {print $3}' | sort -u); do
    case $(basename "$lib") in
      libc.so*|libm.so*|libgcc_s*|libstdc++*|ld-linux*|libpthread*|libdl.so*|librt.so*|libcublas*|libnccl*) ;;
      *) cp -L "$lib" "$dir/lib/" ;;
    esac
  done
  strip --strip-debug "$dir"/lib/*.so* "$dir"/bin/* 2>/dev/null || true
  local tmp
  tmp=$(mktemp /tmp/petrel-bundle-XXXXXX.tar.xz)
  tar -C "$dir" -cJf "$tmp" bin lib && rm -rf "$dir"/bin "$dir"/lib && mv "$tmp" "$dir/bundle.tar.xz"
  du -sh "$dir"
}

bundle_unpack() {
  local dir=$1 root
  shift
  if [[ -f $dir/bundle.tar.xz ]]; then
    root=/tmp/petrel-bundle-$(basename "$dir")
    mkdir -p "$root" && tar -C "$root" -xJf "$dir/bundle.tar.xz" || return 1
  elif [[ -d $dir/bin ]]; then
    root=$dir
  else
    echo "no bundle in $dir: run this script's 'package' step on the build machine first" >&2
    return 1
  fi
  chmod +x "$root"/bin/*
  BUNDLE_ROOT=$root
  BUNDLE_BIN=$root/bin
  local blas_dir extra
  blas_dir=$(dirname "$(find /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda-*/lib64 /opt/torch/.venv \
    -name 'libcublasLt.so.13*' 2>/dev/null | head -1)")
  extra=$(IFS=:; echo "$*")
  export LD_LIBRARY_PATH=$root/lib:$blas_dir${extra:+:$extra}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
}

# The folder holding the device's libnccl.so.2 (torch's copy; Petrel dlopens it), or nothing.
nccl_lib_dir() {
  local lib
  lib=$(find /opt /usr/local /usr/lib -name 'libnccl.so.2*' 2>/dev/null | head -1)
  [[ -z $lib ]] && lib=$(find / -xdev -name 'libnccl.so.2*' 2>/dev/null | head -1)
  [[ -n $lib ]] && dirname "$lib"
}

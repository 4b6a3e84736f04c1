# Sourced by the bench scripts: from the repo root, builds the release
# binary into the shared target dir and sets `cache` and `bin`.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cache="${XDG_CACHE_HOME:-$HOME/.cache}/infermesh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
cargo build --release -p infermesh-gateway
bin="$CARGO_TARGET_DIR/release/infermesh"

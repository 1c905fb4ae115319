"""Dataset readers: public SFT and preference data to plain-text examples (no torch here)."""

from offline_rlhf.data.errors import DataError
from offline_rlhf.data.preference_readers import PREFERENCE_READERS, PreferenceExample, read_preference_source
from offline_rlhf.data.sft_readers import READERS, SFTExample, read_sft_source
from offline_rlhf.data.template import ChatTemplate

__all__ = [
    "ChatTemplate",
    "DataError",
    "PREFERENCE_READERS",
    "PreferenceExample",
    "READERS",
    "SFTExample",
    "read_preference_source",
    "read_sft_source",
]

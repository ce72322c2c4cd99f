"""Moved: shard sample decoding lives in ``wan_animate.samples`` (the library reads shards; data_tools
writes them). These names stay importable from here for existing callers; new code imports
``wan_animate.samples``."""

from wan_animate.samples import (  # noqa: F401
    VIDEO_FIELDS,
    SampleDecodeError,
    decode_cached_sample,
    decode_meta,
    decode_sample,
    load_text_embeds,
    sample_key,
    sample_kind,
)

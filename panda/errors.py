"""The project's own error types: each names the file or record at fault and what to do about it."""


class PandaError(Exception):
    """Base class of every error panda raises on purpose."""


class ConfigError(PandaError, ValueError):
    """A setting that cannot work here (e.g. a folder it names does not exist); the message names the key."""


class VideoDecodeError(PandaError):
    """A video could not be opened or decoded (missing, empty, truncated, unsupported codec)."""

    def __init__(self, path, reason: str, code: str = "undecodable"):
        self.path = str(path)
        self.reason = reason
        self.code = code  # short reject code: missing, empty_file, unreadable, no_video_stream, undecodable, ...
        super().__init__(f"cannot decode video {self.path}: {reason}")


class RecordError(PandaError):
    """An annotation record is malformed (missing keys, wrong types, bad conversation)."""

    def __init__(self, source, index, reason: str, code: str = "malformed_record"):
        self.source = str(source)
        self.index = index
        self.reason = reason
        self.code = code  # short reject code, as in rejects.jsonl
        super().__init__(f"{self.source}, record {index}: {reason}")


class SampleError(PandaError):
    """A record could not be turned into a training sample (e.g. too long, no supervised token)."""

    def __init__(self, record_id, video, reason: str, code: str = "unusable_sample"):
        self.record_id = record_id
        self.video = video
        self.reason = reason
        self.code = code  # short reject code: too_long, unusable_sample
        super().__init__(f"sample {record_id!r} ({video}): {reason}")

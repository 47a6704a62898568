from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    TORCH: _ClassVar[Backend]
    FAISS: _ClassVar[Backend]
    LSH: _ClassVar[Backend]
    FAISS_IVF: _ClassVar[Backend]

class SearchDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_DTYPE_UNSPECIFIED: _ClassVar[SearchDtype]
    SEARCH_FLOAT32: _ClassVar[SearchDtype]
    SEARCH_BFLOAT16: _ClassVar[SearchDtype]

class ResultField(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULT_FIELD_UNSPECIFIED: _ClassVar[ResultField]
    NEIGHBORS: _ClassVar[ResultField]
    NEIGHBOR_KEYS: _ClassVar[ResultField]
    WEIGHTS: _ClassVar[ResultField]
    POSITIVE_NEGATIVE: _ClassVar[ResultField]
    POSITIVE_NEGATIVE_KEYS: _ClassVar[ResultField]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
INT64: DType
BOOL: DType
BACKEND_UNSPECIFIED: Backend
TORCH: Backend
FAISS: Backend
LSH: Backend
FAISS_IVF: Backend
SEARCH_DTYPE_UNSPECIFIED: SearchDtype
SEARCH_FLOAT32: SearchDtype
SEARCH_BFLOAT16: SearchDtype
RESULT_FIELD_UNSPECIFIED: ResultField
NEIGHBORS: ResultField
NEIGHBOR_KEYS: ResultField
WEIGHTS: ResultField
POSITIVE_NEGATIVE: ResultField
POSITIVE_NEGATIVE_KEYS: ResultField

class Array(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class MemoryConfig(_message.Message):
    __slots__ = ("key_dim", "memory_size", "choose_k", "alpha", "age_noise", "correct_in_top", "seed", "device", "search_dtype", "backend", "shards", "devices", "lsh_tables", "lsh_bits", "lsh_probes", "ivf_lists", "ivf_probes", "ivf_codes", "placement", "ivf_quantizer")
    KEY_DIM_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHOOSE_K_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    AGE_NOISE_FIELD_NUMBER: _ClassVar[int]
    CORRECT_IN_TOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SEARCH_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LSH_TABLES_FIELD_NUMBER: _ClassVar[int]
    LSH_BITS_FIELD_NUMBER: _ClassVar[int]
    LSH_PROBES_FIELD_NUMBER: _ClassVar[int]
    IVF_LISTS_FIELD_NUMBER: _ClassVar[int]
    IVF_PROBES_FIELD_NUMBER: _ClassVar[int]
    IVF_CODES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    IVF_QUANTIZER_FIELD_NUMBER: _ClassVar[int]
    key_dim: int
    memory_size: int
    choose_k: int
    alpha: float
    age_noise: float
    correct_in_top: int
    seed: int
    device: str
    search_dtype: SearchDtype
    backend: Backend
    shards: int
    devices: _containers.RepeatedScalarFieldContainer[str]
    lsh_tables: int
    lsh_bits: int
    lsh_probes: int
    ivf_lists: int
    ivf_probes: int
    ivf_codes: str
    placement: str
    ivf_quantizer: str
    def __init__(self, key_dim: _Optional[int] = ..., memory_size: _Optional[int] = ..., choose_k: _Optional[int] = ..., alpha: _Optional[float] = ..., age_noise: _Optional[float] = ..., correct_in_top: _Optional[int] = ..., seed: _Optional[int] = ..., device: _Optional[str] = ..., search_dtype: _Optional[_Union[SearchDtype, str]] = ..., backend: _Optional[_Union[Backend, str]] = ..., shards: _Optional[int] = ..., devices: _Optional[_Iterable[str]] = ..., lsh_tables: _Optional[int] = ..., lsh_bits: _Optional[int] = ..., lsh_probes: _Optional[int] = ..., ivf_lists: _Optional[int] = ..., ivf_probes: _Optional[int] = ..., ivf_codes: _Optional[str] = ..., placement: _Optional[str] = ..., ivf_quantizer: _Optional[str] = ...) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("shard", "slot_start", "slot_stop", "node", "pid", "state", "commit_sequence", "detail")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SLOT_START_FIELD_NUMBER: _ClassVar[int]
    SLOT_STOP_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    shard: int
    slot_start: int
    slot_stop: int
    node: str
    pid: int
    state: str
    commit_sequence: int
    detail: str
    def __init__(self, shard: _Optional[int] = ..., slot_start: _Optional[int] = ..., slot_stop: _Optional[int] = ..., node: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., commit_sequence: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class MemoryStats(_message.Message):
    __slots__ = ("filled_slots", "commit_sequence", "queries", "writes", "merges", "recent_labels")
    FILLED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    MERGES_FIELD_NUMBER: _ClassVar[int]
    RECENT_LABELS_FIELD_NUMBER: _ClassVar[int]
    filled_slots: int
    commit_sequence: int
    queries: int
    writes: int
    merges: int
    recent_labels: int
    def __init__(self, filled_slots: _Optional[int] = ..., commit_sequence: _Optional[int] = ..., queries: _Optional[int] = ..., writes: _Optional[int] = ..., merges: _Optional[int] = ..., recent_labels: _Optional[int] = ...) -> None: ...

class MemoryInfo(_message.Message):
    __slots__ = ("name", "config", "stats", "recovery", "shards", "footprint_bytes")
    class FootprintBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: MemoryConfig
    stats: MemoryStats
    recovery: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    footprint_bytes: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[MemoryConfig, _Mapping]] = ..., stats: _Optional[_Union[MemoryStats, _Mapping]] = ..., recovery: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., footprint_bytes: _Optional[_Mapping[str, int]] = ...) -> None: ...

class CreateMemoryRequest(_message.Message):
    __slots__ = ("name", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: MemoryConfig
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[MemoryConfig, _Mapping]] = ...) -> None: ...

class GetMemoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListMemoriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMemoriesResponse(_message.Message):
    __slots__ = ("memories",)
    MEMORIES_FIELD_NUMBER: _ClassVar[int]
    memories: _containers.RepeatedCompositeFieldContainer[MemoryInfo]
    def __init__(self, memories: _Optional[_Iterable[_Union[MemoryInfo, _Mapping]]] = ...) -> None: ...

class DeleteMemoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClearMemoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("memory", "queries", "labels", "k", "use_recent", "update", "fields", "writer")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    USE_RECENT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    memory: str
    queries: Array
    labels: Array
    k: int
    use_recent: bool
    update: bool
    fields: _containers.RepeatedScalarFieldContainer[ResultField]
    writer: str
    def __init__(self, memory: _Optional[str] = ..., queries: _Optional[_Union[Array, _Mapping]] = ..., labels: _Optional[_Union[Array, _Mapping]] = ..., k: _Optional[int] = ..., use_recent: _Optional[bool] = ..., update: _Optional[bool] = ..., fields: _Optional[_Iterable[_Union[ResultField, str]]] = ..., writer: _Optional[str] = ...) -> None: ...

class QueryTicket(_message.Message):
    __slots__ = ("relied_slots", "relied_generations", "k", "use_recent", "memory_incarnation")
    RELIED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RELIED_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    USE_RECENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    relied_slots: Array
    relied_generations: Array
    k: int
    use_recent: bool
    memory_incarnation: int
    def __init__(self, relied_slots: _Optional[_Union[Array, _Mapping]] = ..., relied_generations: _Optional[_Union[Array, _Mapping]] = ..., k: _Optional[int] = ..., use_recent: _Optional[bool] = ..., memory_incarnation: _Optional[int] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("commit_sequence", "predictions", "incorrect", "written_slots", "ticket", "neighbor_slots", "neighbor_similarities", "neighbor_values", "neighbor_keys", "weights", "positive_slots", "positive_similarities", "negative_slots", "negative_similarities", "positive_keys", "negative_keys")
    COMMIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    INCORRECT_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_SLOTS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOR_SLOTS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOR_SIMILARITIES_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOR_VALUES_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOR_KEYS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_SIMILARITIES_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_SIMILARITIES_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_KEYS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_KEYS_FIELD_NUMBER: _ClassVar[int]
    commit_sequence: int
    predictions: Array
    incorrect: Array
    written_slots: Array
    ticket: QueryTicket
    neighbor_slots: Array
    neighbor_similarities: Array
    neighbor_values: Array
    neighbor_keys: Array
    weights: Array
    positive_slots: Array
    positive_similarities: Array
    negative_slots: Array
    negative_similarities: Array
    positive_keys: Array
    negative_keys: Array
    def __init__(self, commit_sequence: _Optional[int] = ..., predictions: _Optional[_Union[Array, _Mapping]] = ..., incorrect: _Optional[_Union[Array, _Mapping]] = ..., written_slots: _Optional[_Union[Array, _Mapping]] = ..., ticket: _Optional[_Union[QueryTicket, _Mapping]] = ..., neighbor_slots: _Optional[_Union[Array, _Mapping]] = ..., neighbor_similarities: _Optional[_Union[Array, _Mapping]] = ..., neighbor_values: _Optional[_Union[Array, _Mapping]] = ..., neighbor_keys: _Optional[_Union[Array, _Mapping]] = ..., weights: _Optional[_Union[Array, _Mapping]] = ..., positive_slots: _Optional[_Union[Array, _Mapping]] = ..., positive_similarities: _Optional[_Union[Array, _Mapping]] = ..., negative_slots: _Optional[_Union[Array, _Mapping]] = ..., negative_similarities: _Optional[_Union[Array, _Mapping]] = ..., positive_keys: _Optional[_Union[Array, _Mapping]] = ..., negative_keys: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("memory", "queries", "labels", "ticket", "writer")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    memory: str
    queries: Array
    labels: Array
    ticket: QueryTicket
    writer: str
    def __init__(self, memory: _Optional[str] = ..., queries: _Optional[_Union[Array, _Mapping]] = ..., labels: _Optional[_Union[Array, _Mapping]] = ..., ticket: _Optional[_Union[QueryTicket, _Mapping]] = ..., writer: _Optional[str] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("commit_sequence", "written_slots", "incorrect", "revalidated_rows")
    COMMIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_SLOTS_FIELD_NUMBER: _ClassVar[int]
    INCORRECT_FIELD_NUMBER: _ClassVar[int]
    REVALIDATED_ROWS_FIELD_NUMBER: _ClassVar[int]
    commit_sequence: int
    written_slots: Array
    incorrect: Array
    revalidated_rows: int
    def __init__(self, commit_sequence: _Optional[int] = ..., written_slots: _Optional[_Union[Array, _Mapping]] = ..., incorrect: _Optional[_Union[Array, _Mapping]] = ..., revalidated_rows: _Optional[int] = ...) -> None: ...

class SlotRange(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class ReadSlotsRequest(_message.Message):
    __slots__ = ("memory", "slots", "range")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    memory: str
    slots: Array
    range: SlotRange
    def __init__(self, memory: _Optional[str] = ..., slots: _Optional[_Union[Array, _Mapping]] = ..., range: _Optional[_Union[SlotRange, _Mapping]] = ...) -> None: ...

class ReadSlotsResponse(_message.Message):
    __slots__ = ("commit_sequence", "slots", "keys", "values", "ages", "generations", "writers", "writer_names")
    COMMIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    AGES_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    WRITERS_FIELD_NUMBER: _ClassVar[int]
    WRITER_NAMES_FIELD_NUMBER: _ClassVar[int]
    commit_sequence: int
    slots: Array
    keys: Array
    values: Array
    ages: Array
    generations: Array
    writers: Array
    writer_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, commit_sequence: _Optional[int] = ..., slots: _Optional[_Union[Array, _Mapping]] = ..., keys: _Optional[_Union[Array, _Mapping]] = ..., values: _Optional[_Union[Array, _Mapping]] = ..., ages: _Optional[_Union[Array, _Mapping]] = ..., generations: _Optional[_Union[Array, _Mapping]] = ..., writers: _Optional[_Union[Array, _Mapping]] = ..., writer_names: _Optional[_Iterable[str]] = ...) -> None: ...

class InspectMemoryRequest(_message.Message):
    __slots__ = ("memory", "age_bins", "top_labels")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    AGE_BINS_FIELD_NUMBER: _ClassVar[int]
    TOP_LABELS_FIELD_NUMBER: _ClassVar[int]
    memory: str
    age_bins: int
    top_labels: int
    def __init__(self, memory: _Optional[str] = ..., age_bins: _Optional[int] = ..., top_labels: _Optional[int] = ...) -> None: ...

class MemoryReport(_message.Message):
    __slots__ = ("commit_sequence", "memory_size", "filled_slots", "queries", "writes", "merges", "age_bin_edges", "age_counts", "distinct_labels", "top_labels", "top_label_counts", "key_norm_min", "key_norm_max", "keys_off_unit", "keys_non_finite", "writers")
    COMMIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILLED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    MERGES_FIELD_NUMBER: _ClassVar[int]
    AGE_BIN_EDGES_FIELD_NUMBER: _ClassVar[int]
    AGE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_LABELS_FIELD_NUMBER: _ClassVar[int]
    TOP_LABELS_FIELD_NUMBER: _ClassVar[int]
    TOP_LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    KEY_NORM_MIN_FIELD_NUMBER: _ClassVar[int]
    KEY_NORM_MAX_FIELD_NUMBER: _ClassVar[int]
    KEYS_OFF_UNIT_FIELD_NUMBER: _ClassVar[int]
    KEYS_NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    WRITERS_FIELD_NUMBER: _ClassVar[int]
    commit_sequence: int
    memory_size: int
    filled_slots: int
    queries: int
    writes: int
    merges: int
    age_bin_edges: Array
    age_counts: Array
    distinct_labels: int
    top_labels: Array
    top_label_counts: Array
    key_norm_min: float
    key_norm_max: float
    keys_off_unit: int
    keys_non_finite: int
    writers: _containers.RepeatedCompositeFieldContainer[WriterReport]
    def __init__(self, commit_sequence: _Optional[int] = ..., memory_size: _Optional[int] = ..., filled_slots: _Optional[int] = ..., queries: _Optional[int] = ..., writes: _Optional[int] = ..., merges: _Optional[int] = ..., age_bin_edges: _Optional[_Union[Array, _Mapping]] = ..., age_counts: _Optional[_Union[Array, _Mapping]] = ..., distinct_labels: _Optional[int] = ..., top_labels: _Optional[_Union[Array, _Mapping]] = ..., top_label_counts: _Optional[_Union[Array, _Mapping]] = ..., key_norm_min: _Optional[float] = ..., key_norm_max: _Optional[float] = ..., keys_off_unit: _Optional[int] = ..., keys_non_finite: _Optional[int] = ..., writers: _Optional[_Iterable[_Union[WriterReport, _Mapping]]] = ...) -> None: ...

class WriterReport(_message.Message):
    __slots__ = ("name", "slots", "writes", "merges")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    MERGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    slots: int
    writes: int
    merges: int
    def __init__(self, name: _Optional[str] = ..., slots: _Optional[int] = ..., writes: _Optional[int] = ..., merges: _Optional[int] = ...) -> None: ...

class FindLabelRequest(_message.Message):
    __slots__ = ("memory", "label")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    memory: str
    label: int
    def __init__(self, memory: _Optional[str] = ..., label: _Optional[int] = ...) -> None: ...

class FindLabelResponse(_message.Message):
    __slots__ = ("commit_sequence", "slots", "ages", "recent_slot")
    COMMIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    AGES_FIELD_NUMBER: _ClassVar[int]
    RECENT_SLOT_FIELD_NUMBER: _ClassVar[int]
    commit_sequence: int
    slots: Array
    ages: Array
    recent_slot: int
    def __init__(self, commit_sequence: _Optional[int] = ..., slots: _Optional[_Union[Array, _Mapping]] = ..., ages: _Optional[_Union[Array, _Mapping]] = ..., recent_slot: _Optional[int] = ...) -> None: ...

class SnapshotMemoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SnapshotMemoryResponse(_message.Message):
    __slots__ = ("commit_sequence", "path", "bytes")
    COMMIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    commit_sequence: int
    path: str
    bytes: int
    def __init__(self, commit_sequence: _Optional[int] = ..., path: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class ExportMemoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RetrainIndexRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RetrainIndexResponse(_message.Message):
    __slots__ = ("commit_sequence", "rewritten_slots", "seconds")
    COMMIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REWRITTEN_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    commit_sequence: int
    rewritten_slots: int
    seconds: float
    def __init__(self, commit_sequence: _Optional[int] = ..., rewritten_slots: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ImportMemoryRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ImportHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ImportHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImportHeader(_message.Message):
    __slots__ = ("name", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: MemoryConfig
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[MemoryConfig, _Mapping]] = ...) -> None: ...

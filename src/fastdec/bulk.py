"""Old import path of ``fastdec decode-batch``: the library is :mod:`fastdec.decode.batch` (latent files:
:mod:`fastdec.io.latents`), the command :mod:`fastdec.decode.cli`. ``add_commands`` here registers
``decode-batch`` only."""
from .decode.batch import (  # noqa: F401
    FORMATS,
    MANIFEST_NAME,
    PROGRESS_FILE,
    RANK_MANIFEST,
    TEMP_SUFFIX,
    BatchOptions,
    Failure,
    ImageWriter,
    RankStats,
    WorkItem,
    batches_by_shape,
    build_work_list,
    check_manifest,
    clean_temp_files,
    current_identity,
    decode_batch,
    decoder_identity,
    describe_difference,
    existing_manifests,
    image_is_complete,
    merge_manifests,
    shard_for_rank,
    summarize,
    weights_hash,
    writer_path,
)
from .decode.cli import add_decode_batch_command as add_commands  # noqa: F401
from .decode.cli import run_decode_batch  # noqa: F401
from .errors import LatentFileError, ManifestMismatchError  # noqa: F401
from .io.images import save_image, to_uint8  # noqa: F401
from .io.latents import (  # noqa: F401
    LATENT_SUFFIXES,
    LatentReader,
    LatentRef,
    check_key,
    find_latent_files,
    index_latent_file,
    write_latent_shard,
)

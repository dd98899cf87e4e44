//! The engine's error type: every bad input or missing capability becomes a value with a
//! message that names the problem and the fix. Nothing in the library panics on user input.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No Vulkan / Metal / DX12 adapter was found at all.
    #[error(
        "no GPU adapter found (tried Vulkan, Metal and DX12). Install your GPU's driver; \
         on Linux without a GPU, install a software Vulkan driver (Debian/Ubuntu: \
         `apt-get install mesa-vulkan-drivers`)"
    )]
    NoAdapter,

    /// `--adapter` / `ATELIER_ADAPTER` named an adapter that doesn't exist.
    #[error(
        "no GPU adapter matches {wanted:?}; available: {available}. Pass an index or part of a \
         name from `atelier info` to --adapter (or ATELIER_ADAPTER)"
    )]
    AdapterNotFound { wanted: String, available: String },

    /// The device could not be created.
    #[error("could not open the GPU device {adapter:?}: {reason}")]
    DeviceRequest { adapter: String, reason: String },

    /// A buffer or tensor over the device's limits.
    #[error(
        "{what} needs {bytes} bytes ({mib:.1} MiB), over this GPU's limit of {limit} bytes \
         ({limit_name}); use a smaller size or batch, or a GPU with more memory"
    , mib = *bytes as f64 / 1048576.0)]
    TooLarge { what: String, bytes: u64, limit: u64, limit_name: &'static str },

    /// A shape that doesn't fit the operation.
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: String, detail: String },

    /// A tensor of the wrong element type for an operation.
    #[error("dtype mismatch in {op}: {detail}")]
    DType { op: String, detail: String },

    /// Waiting for the GPU failed (device lost, timeout).
    #[error("GPU error: {0}")]
    Gpu(String),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// Writing a file failed for want of room: the disk is full, or a quota or the
    /// process's file-size limit was reached.
    #[error(
        "{path}: cannot write it ({source}): the disk is full, or a quota or file-size limit was \
         reached; free some space or write elsewhere"
    )]
    NoSpace { path: PathBuf, source: std::io::Error },

    /// A weight file, model folder or config that can't be used: the message names the file
    /// and says what is wrong and how to fix it.
    #[error("{path}: {problem}")]
    Model { path: PathBuf, problem: String },

    /// The tokenizer files could not be loaded or a prompt could not be encoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A command-line argument or option that makes no sense.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// Shorthand for a problem with a model file or folder.
    pub fn model(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Model { path: path.into(), problem: problem.into() }
    }

    /// A failed read or write of `path`: [`Error::NoSpace`] when the disk, a quota or the
    /// file-size limit is full, else [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        use std::io::ErrorKind::{FileTooLarge, QuotaExceeded, StorageFull};
        match source.kind() {
            StorageFull | FileTooLarge | QuotaExceeded => Error::NoSpace { path: path.into(), source },
            _ => Error::Io { path: path.into(), source },
        }
    }

    /// Shorthand for a shape error.
    pub fn shape(op: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Shape { op: op.into(), detail: detail.into() }
    }
}

// tiedlora/core/error.h: the exceptions tiedlora throws.
//
// Errors in user-supplied files (checkpoints, adapters, configs) are tiedlora::FormatError, whose message
// names the file and the tensor or key, llama.cpp style, with a hint where one helps. Argument errors in
// the tensor API (shapes, dtypes, devices) use TORCH_CHECK and surface as c10::Error, like LibTorch itself.
// Both derive from std::exception; only main() catches.
#pragma once

#include <stdexcept>
#include <string>

namespace tiedlora {

/// Base of every exception tiedlora throws itself.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A file or folder given to tiedlora is malformed, truncated, inconsistent or not what was expected.
class FormatError : public Error {
 public:
  using Error::Error;
};

/// Selection, grouping or configuration that cannot be honoured (unknown module names, mixed shapes in
/// one tie group, a freeze mask that cannot start from a zero delta, ...).
class ConfigError : public Error {
 public:
  using Error::Error;
};

/// A long operation stopped because its caller asked it to (a stop_requested callback returned true); it
/// left nothing half-written.
class Cancelled : public Error {
 public:
  using Error::Error;
};

}  // namespace tiedlora

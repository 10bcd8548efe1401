// fuzz_parsers.cpp: libFuzzer target over tiedlora's parsers of untrusted bytes. The first byte picks the
// parser; the rest is its input. Every rejection must be a tiedlora::Error (FormatError / ConfigError);
// any other exception, crash, leak or undefined behaviour (ASan + UBSan) is a finding.
// Built and run by tests/fuzz/run_fuzz.sh (clang's -fsanitize=fuzzer); no LibTorch needed.
#include <cstddef>
#include <cstdint>
#include <string>

#include "tiedlora/core/error.h"
#include "tiedlora/formats/adapter_config.h"
#include "tiedlora/formats/gguf.h"
#include "tiedlora/formats/safetensors_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t parser = data[0] % 3;
  ++data;
  --size;
  try {
    switch (parser) {
      case 0: {
        // The header parser sees the file's first bytes; the file may be longer than what is given.
        const uint64_t file_size = size + (size > 0 ? data[0] % 3 : 0) * 64;
        tiedlora::formats::parse_safetensors_header(data, size, file_size, "fuzz.safetensors");
        break;
      }
      case 1:
        tiedlora::parse_adapter_config(std::string(reinterpret_cast<const char*>(data), size),
                                       "fuzz/adapter_config.json");
        break;
      case 2: tiedlora::formats::parse_gguf(data, size, "fuzz.gguf"); break;
    }
  } catch (const tiedlora::Error&) {
    // A clear rejection: the expected outcome for malformed input.
  }
  return 0;
}

# cmake/TiedloraSentencePiece.cmake: optional SentencePiece tokenizers (Llama 2's tokenizer.model) through the
# system's libsentencepiece (Debian: libsentencepiece-dev), found with pkg-config. TIEDLORA_SENTENCEPIECE=AUTO
# (default) uses it when found; ON makes its absence an error; OFF builds a stub whose
# SentencePieceTokenizer::from_file throws a clear error. Sets TIEDLORA_SENTENCEPIECE_SOURCES for the library.
set(TIEDLORA_SENTENCEPIECE AUTO CACHE STRING "SentencePiece tokenizers through libsentencepiece: AUTO (when pkg-config finds it), ON or OFF")
set_property(CACHE TIEDLORA_SENTENCEPIECE PROPERTY STRINGS AUTO ON OFF)
set(TIEDLORA_WITH_SENTENCEPIECE OFF)
if(NOT TIEDLORA_SENTENCEPIECE STREQUAL "OFF")
  find_package(PkgConfig QUIET)
  if(PKG_CONFIG_FOUND)
    pkg_check_modules(SENTENCEPIECE QUIET IMPORTED_TARGET sentencepiece)
  endif()
  if(SENTENCEPIECE_FOUND)
    set(TIEDLORA_WITH_SENTENCEPIECE ON)
  elseif(TIEDLORA_SENTENCEPIECE STREQUAL "ON")
    message(FATAL_ERROR "TIEDLORA_SENTENCEPIECE=ON but pkg-config cannot find sentencepiece "
                        "(Debian: apt-get install libsentencepiece-dev)")
  endif()
endif()
if(TIEDLORA_WITH_SENTENCEPIECE)
  set(TIEDLORA_SENTENCEPIECE_SOURCES src/llm/tokenizer/sentencepiece_tokenizer.cpp)
  message(STATUS "tiedlora: SentencePiece tokenizers ON (libsentencepiece ${SENTENCEPIECE_VERSION})")
else()
  set(TIEDLORA_SENTENCEPIECE_SOURCES src/llm/tokenizer/sentencepiece_stub.cpp)
  message(STATUS "tiedlora: SentencePiece tokenizers OFF")
endif()

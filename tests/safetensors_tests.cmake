# tests/safetensors_tests.cmake: the safetensors reader/writer against the Python `safetensors` package.
#   reference_safetensors  Python writes files of every dtype, metadata case and a sharded checkpoint
#                          (tests/reference/make_safetensors_reference.py);
#   test_safetensors       the C++ test reads them, writes them again (byte-identical), and checks
#                          malformed inputs, sharding and zero-copy; it writes its files for the check below;
#   safetensors_python_reads_ours
#                          Python's safetensors.torch.load_file reads the C++-written files and compares values.
# Included from tests/CMakeLists.txt, which defines tiedlora_add_reference and tiedlora_add_test.
tiedlora_add_reference(safetensors make_safetensors_reference.py)
tiedlora_add_test(test_safetensors SOURCES test_safetensors.cpp FIXTURES safetensors)
set(TIEDLORA_SAFETENSORS_OUT "${CMAKE_CURRENT_BINARY_DIR}/safetensors_out")
set_property(TEST test_safetensors APPEND PROPERTY ENVIRONMENT "TIEDLORA_SAFETENSORS_OUT=${TIEDLORA_SAFETENSORS_OUT}")
set_tests_properties(test_safetensors PROPERTIES FIXTURES_SETUP safetensors_cpp_output)
add_test(NAME safetensors_python_reads_ours
  COMMAND "${TIEDLORA_PYTHON}" "${CMAKE_CURRENT_SOURCE_DIR}/reference/check_safetensors_written.py"
    --reference "${TIEDLORA_REFERENCE_DIR}/safetensors" --written "${TIEDLORA_SAFETENSORS_OUT}")
set_tests_properties(safetensors_python_reads_ours PROPERTIES
  FIXTURES_REQUIRED "safetensors;safetensors_cpp_output"
  ENVIRONMENT "CUDA_VISIBLE_DEVICES=")

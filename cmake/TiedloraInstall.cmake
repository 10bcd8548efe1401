# Install rules and the package config that makes find_package(tiedlora) work for consumers.
include(CMakePackageConfigHelpers)
set(TIEDLORA_CMAKE_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/tiedlora")
# The layers are shared libraries: the kernels and util (static, PIC), nlohmann_json, sentencepiece, MPI, NCCL
# and cudart are private to them. Each is a component of the package (find_package(tiedlora COMPONENTS core)).
install(TARGETS tiedlora_core tiedlora_formats tiedlora_llm tiedlora_distributed tiedlora EXPORT tiedloraTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY include/tiedlora DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
if(TIEDLORA_BUILD_TOOLS)
  install(TARGETS tiedlora_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
install(EXPORT tiedloraTargets NAMESPACE tiedlora:: DESTINATION ${TIEDLORA_CMAKE_DIR})
configure_package_config_file(cmake/tiedloraConfig.cmake.in
  "${CMAKE_CURRENT_BINARY_DIR}/tiedloraConfig.cmake" INSTALL_DESTINATION ${TIEDLORA_CMAKE_DIR})
write_basic_package_version_file("${CMAKE_CURRENT_BINARY_DIR}/tiedloraConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/tiedloraConfig.cmake"
  "${CMAKE_CURRENT_BINARY_DIR}/tiedloraConfigVersion.cmake" DESTINATION ${TIEDLORA_CMAKE_DIR})

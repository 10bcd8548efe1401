# cmake/TiedloraOptionalFeature.cmake: the one AUTO/ON/OFF rule for optional features (CUDA kernels,
# SentencePiece, MPI, NCCL, loss charts), written once:
#   tiedlora_optional_feature(<FEATURE> DOC <what it gives> HINT <how to get it>
#                             {PKG_CONFIG <prefix> <module> | PROBE <function>})
# declares the cache variable TIEDLORA_<FEATURE> (AUTO by default, ON or OFF); unless it is OFF, looks for the
# feature (a pkg-config module, imported as PkgConfig::<prefix>, or `<function>(found detail)`, which answers
# with tiedlora_probe_answer(ON|OFF <detail for the status line>)); sets TIEDLORA_WITH_<FEATURE> ON or OFF in
# the caller's scope; prints one status line; and stops the configuration when ON was asked for but the
# feature cannot be built.
function(tiedlora_optional_feature feature)
  cmake_parse_arguments(ARG "" "DOC;HINT;PROBE" "PKG_CONFIG" ${ARGN})
  set(option TIEDLORA_${feature})
  set(${option} AUTO CACHE STRING "${ARG_DOC}: AUTO (when found), ON or OFF")
  set_property(CACHE ${option} PROPERTY STRINGS AUTO ON OFF)
  set(found OFF)
  set(detail "not found")
  if(${option} STREQUAL "OFF")
    # not looked for
  elseif(ARG_PKG_CONFIG)
    list(GET ARG_PKG_CONFIG 0 prefix)
    list(GET ARG_PKG_CONFIG 1 module)
    find_package(PkgConfig QUIET)
    if(PKG_CONFIG_FOUND)
      pkg_check_modules(${prefix} QUIET IMPORTED_TARGET ${module})
    endif()
    if(${prefix}_FOUND)
      set(found ON)
      set(detail "${module} ${${prefix}_VERSION}")
    else()
      set(detail "pkg-config cannot find ${module}")
    endif()
  else()
    cmake_language(CALL ${ARG_PROBE} found detail)
  endif()
  if(found)
    message(STATUS "tiedlora: ${ARG_DOC} ON (${detail})")
  elseif(${option} STREQUAL "ON")
    message(FATAL_ERROR "${option}=ON but ${ARG_DOC} cannot be built: ${detail} (hint: ${ARG_HINT})")
  elseif(${option} STREQUAL "OFF")
    message(STATUS "tiedlora: ${ARG_DOC} OFF (${option}=OFF)")
  else()
    message(STATUS "tiedlora: ${ARG_DOC} OFF (${detail}; hint: ${ARG_HINT})")
  endif()
  set(TIEDLORA_WITH_${feature} ${found} PARENT_SCOPE)
endfunction()

# The answer of a probe function(<name> found detail) to tiedlora_optional_feature: whether the feature can be
# built, and what the status line says about it (a version, a path, or why not).
macro(tiedlora_probe_answer value text)
  set(${found} ${value} PARENT_SCOPE)
  set(${detail} "${text}" PARENT_SCOPE)
endmacro()

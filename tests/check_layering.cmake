# check_layering.cmake: no layer includes a layer above it (docs/design.md, "Layers"). From the bottom:
#   kernels/  (no torch, no tiedlora host header)  <-  core  <-  formats (with src/util/)  <-  llm  <-  programs
# A header or source of a layer may include its own layer's headers and those below; the programs' headers
# (tools/) are never included by a library. Run: cmake -DSOURCE_DIR=<repo> -P check_layering.cmake
set(layers core formats llm)
# What each layer may not include (regular expressions over the text of #include lines).
set(forbidden_kernels "#include [<\"](torch/|ATen/|c10/|tiedlora/|core/|util/|llm/)")
set(forbidden_core "#include [<\"](tiedlora/(formats|llm)[/.]|util/|llm/|chart/|signals\\.h|model_discovery\\.h)")
set(forbidden_formats "#include [<\"](tiedlora/llm[/.]|llm/|chart/|signals\\.h|model_discovery\\.h)")
set(forbidden_llm "#include [<\"](chart/|signals\\.h|model_discovery\\.h)")
set(forbidden_util "${forbidden_formats}")

function(check_folder label regex)
  set(files ${ARGN})
  list(LENGTH files count)
  if(count EQUAL 0)
    message(FATAL_ERROR "layer ${label}: no files found (has the tree moved?)")
  endif()
  foreach(f IN LISTS files)
    file(STRINGS "${f}" hits REGEX "${regex}")
    if(hits)
      message(FATAL_ERROR "${f} (layer ${label}) includes a layer above it: ${hits}")
    endif()
  endforeach()
  math(EXPR total "${total} + ${count}")
  set(total ${total} PARENT_SCOPE)
endfunction()

set(total 0)
file(GLOB kernel_files "${SOURCE_DIR}/kernels/*.cu" "${SOURCE_DIR}/kernels/*.cuh")
check_folder(kernels "${forbidden_kernels}" ${kernel_files})
foreach(layer IN LISTS layers)
  file(GLOB_RECURSE layer_files "${SOURCE_DIR}/include/tiedlora/${layer}/*.h" "${SOURCE_DIR}/src/${layer}/*.cpp"
       "${SOURCE_DIR}/src/${layer}/*.h" "${SOURCE_DIR}/include/tiedlora/${layer}.h")
  check_folder(${layer} "${forbidden_${layer}}" ${layer_files})
endforeach()
file(GLOB util_files "${SOURCE_DIR}/src/util/*.cpp" "${SOURCE_DIR}/src/util/*.h")
check_folder(util "${forbidden_util}" ${util_files})
# Nothing of the library is left outside the layer folders.
file(GLOB stray "${SOURCE_DIR}/include/tiedlora/*.h")
list(REMOVE_ITEM stray "${SOURCE_DIR}/include/tiedlora/tiedlora.h" "${SOURCE_DIR}/include/tiedlora/core.h"
     "${SOURCE_DIR}/include/tiedlora/formats.h" "${SOURCE_DIR}/include/tiedlora/llm.h")
file(GLOB stray_sources "${SOURCE_DIR}/src/*.cpp")
if(stray OR stray_sources)
  message(FATAL_ERROR "outside the layer folders: ${stray} ${stray_sources}")
endif()
message(STATUS "${total} files checked: no layer includes one above it")

# check_no_std_filesystem.cmake: tiedlora's own code must not call std::filesystem (README "Known
# problems": programs linked against the torch wheel can bind to the wheel's broken copy of it).
# Run: cmake -DSOURCE_DIR=<repo> -P check_no_std_filesystem.cmake
file(GLOB_RECURSE files "${SOURCE_DIR}/src/*.cpp" "${SOURCE_DIR}/src/*.h" "${SOURCE_DIR}/include/*.h"
     "${SOURCE_DIR}/tools/*.cpp" "${SOURCE_DIR}/tools/*.h" "${SOURCE_DIR}/examples/*.cpp")
list(LENGTH files count)
if(count LESS 20)
  message(FATAL_ERROR "found only ${count} source files under ${SOURCE_DIR}")
endif()
foreach(f IN LISTS files)
  file(STRINGS "${f}" hits REGEX "std::filesystem::|#include <filesystem>")
  if(hits)
    message(FATAL_ERROR "${f} uses std::filesystem: ${hits}")
  endif()
endforeach()
message(STATUS "${count} files checked: no std::filesystem")

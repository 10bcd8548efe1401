// util/files.h: the few file-system operations tiedlora needs, on POSIX calls. std::filesystem is avoided
// on purpose: LibTorch's wheel exports GCC 13 std::filesystem symbols that shadow the system's GCC 12
// ones, and some operations (remove_all on a non-empty folder) crash (docs/design.md).
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

namespace tiedlora::util {

bool is_directory(const std::string& path);
bool is_regular_file(const std::string& path);
bool path_exists(const std::string& path);
std::string join_path(const std::string& folder, const std::string& name);
/// "a/b/c" -> "a/b"; "c" -> ".".
std::string parent_path(const std::string& path);
/// Names in `folder` (no "." or ".."), sorted; throws tiedlora::Error when it cannot be read.
std::vector<std::string> list_directory(const std::string& folder);
/// The whole file; throws tiedlora::FormatError naming it when it cannot be read.
std::string read_text_file(const std::string& path);
/// Creates a fresh, uniquely named folder beside `destination` ("<destination>.tmp-XXXXXX").
std::string make_temp_directory_beside(const std::string& destination);
/// Removes a file or a folder tree; missing paths are fine. Never follows symbolic links.
void remove_tree(const std::string& path);
/// Creates `path` and its missing parents; throws tiedlora::Error naming them when it cannot.
void make_directories(const std::string& path);
/// Writes a file atomically: `<path>.tmp.<pid>` beside the destination, fsync, rename, fsync the folder.
/// `fill` receives a function that appends bytes; if anything throws, the temporary is removed and `path`
/// is untouched.
using ByteWriter = std::function<void(const void* data, std::size_t size)>;
void write_file_atomically(const std::string& path, const std::function<void(const ByteWriter&)>& fill);
/// remove_tree for cleanup paths: never throws (a failure to clean up must not hide the original error).
void remove_tree_quietly(const std::string& path) noexcept;
/// Copies a regular file byte for byte (the copy is fsynced).
void copy_file(const std::string& from, const std::string& to);
/// Moves the finished folder `staged` to `destination`. An existing destination is an error unless
/// `overwrite`, in which case it is renamed aside first and removed after the move (best effort). The
/// parent folder is fsynced so the rename survives a crash.
void publish_directory(const std::string& staged, const std::string& destination, bool overwrite);

}  // namespace tiedlora::util

// tiedlora/formats/files.h: the file operations the libraries use for their own outputs, for programs that
// write beside them: POSIX calls, not std::filesystem (whose symbols LibTorch's wheel exports in a build
// that crashes remove_all on older systems: README, "Known problems"), and writes that are atomic, so a
// crash never leaves half a file.
#pragma once

#include <string>

namespace tiedlora::formats {

bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
bool is_regular_file(const std::string& path);
/// "folder/name" ("name" alone when `folder` is empty).
std::string join_path(const std::string& folder, const std::string& name);
/// The whole file; throws tiedlora::FormatError naming it when it cannot be read.
std::string read_text_file(const std::string& path);
/// Writes `text` (any bytes) to `path` atomically: a temporary file beside it, fsynced and renamed into place.
void write_text_file(const std::string& path, const std::string& text);
/// Removes a file or a folder tree; missing paths are fine. Never follows symbolic links.
void remove_tree(const std::string& path);

}  // namespace tiedlora::formats

// util/files.h: the few file-system operations tiedlora needs, on POSIX calls. std::filesystem is avoided
// on purpose: LibTorch's wheel exports its own std::filesystem symbols, which programs linked against it
// bind to (README "Known problems"; docs/design.md).
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace tiedlora::util {

bool is_directory(const std::string& path);
bool is_regular_file(const std::string& path);
/// True for a symbolic link itself (lstat), whatever it points to.
bool is_symbolic_link(const std::string& path);
bool path_exists(const std::string& path);
std::string join_path(const std::string& folder, const std::string& name);
/// "a/b/c" -> "a/b"; "c" -> ".".
std::string parent_path(const std::string& path);
/// Names in `folder` (no "." or ".."), sorted; throws tiedlora::Error when it cannot be read.
std::vector<std::string> list_directory(const std::string& folder);
/// The whole file; throws tiedlora::FormatError naming it when it cannot be read.
std::string read_text_file(const std::string& path);
/// Creates a fresh, uniquely named folder beside `destination`:
/// "<destination>.tmp-<host>-<pid>-[<kind>-]<random>" (kind "old": an old destination moved aside), with
/// the mode mkdir(1) would give (0777 less the umask), so the folder it becomes when renamed into place is
/// readable as the user's umask says.
std::string make_temp_directory_beside(const std::string& destination, const std::string& kind = "");
/// Temporary folders that processes of this host left beside `destination` when they died (SIGKILL, a
/// crash, power loss), found by the name make_temp_directory_beside gives: a folder whose process is gone
/// is removed, and an old destination moved aside by publish_directory is moved back when `destination`
/// is missing. Returns one line per folder handled, for the caller to report.
std::vector<std::string> clean_stale_temporaries(const std::string& destination);

/// A folder written in full before it appears at `destination`: the constructor cleans stale temporaries
/// (reporting each as a LibTorch warning) and creates the temporary folder (path()); publish() renames it
/// into place; if publish() is never reached, the destructor removes it.
class StagedDirectory {
 public:
  explicit StagedDirectory(std::string destination);
  ~StagedDirectory();
  StagedDirectory(const StagedDirectory&) = delete;
  StagedDirectory& operator=(const StagedDirectory&) = delete;
  const std::string& path() const { return path_; }
  void publish(bool overwrite);

 private:
  std::string destination_, path_;
  bool published_ = false;
};

/// The absolute path with symbolic links of its existing part resolved and "." / ".." removed.
std::string resolve_path(const std::string& path);
/// True when the resolved path `inner` lies strictly inside the resolved folder `outer` (resolve_path both).
bool lies_inside(const std::string& inner, const std::string& outer);
/// Refuses (tiedlora::ConfigError, naming both) an output path that equals, contains or lies inside one
/// of the inputs (label, path): writing it, or replacing it with --force, would destroy an input.
void check_output_apart_from_inputs(const std::string& output_label, const std::string& output,
                                    const std::vector<std::pair<std::string, std::string>>& inputs);
/// Removes a file or a folder tree; missing paths are fine. Never follows symbolic links.
void remove_tree(const std::string& path);
/// Creates `path` and its missing parents; throws tiedlora::Error naming them when it cannot.
void make_directories(const std::string& path);
/// Writes a file atomically: `<path>.tmp.<pid>.<n>` beside the destination, fsync, rename, fsync the folder.
/// `fill` receives a function that appends bytes; if anything throws, the temporary is removed and `path`
/// is untouched.
using ByteWriter = std::function<void(const void* data, std::size_t size)>;
void write_file_atomically(const std::string& path, const std::function<void(const ByteWriter&)>& fill);
/// remove_tree for cleanup paths: never throws (a failure to clean up must not hide the original error).
void remove_tree_quietly(const std::string& path) noexcept;
/// Copies a regular file byte for byte (the copy is fsynced). A file it creates gets what a plain creation
/// gets (0666 less the umask) less what the source's mode does not grant: a copy never widens access.
void copy_file(const std::string& from, const std::string& to);
/// Moves the finished folder `staged` to `destination`. An existing destination is an error unless
/// `overwrite`, in which case it is renamed aside first and removed after the move (best effort). The
/// parent folder is fsynced so the rename survives a crash.
void publish_directory(const std::string& staged, const std::string& destination, bool overwrite);

}  // namespace tiedlora::util

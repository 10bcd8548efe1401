// util/files.cpp: POSIX implementations of util/files.h.
#include "util/files.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include <c10/util/Exception.h>

#include "tiedlora/core/error.h"

namespace tiedlora::util {
namespace {

std::string errno_text() { return std::strerror(errno); }

bool stat_mode(const std::string& path, mode_t type) {
  struct stat st{};
  return ::stat(path.c_str(), &st) == 0 && (st.st_mode & S_IFMT) == type;
}

}  // namespace

bool is_directory(const std::string& path) { return stat_mode(path, S_IFDIR); }
bool is_regular_file(const std::string& path) { return stat_mode(path, S_IFREG); }
bool is_symbolic_link(const std::string& path) {
  struct stat st{};
  return ::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode);
}
bool path_exists(const std::string& path) {
  struct stat st{};
  return ::lstat(path.c_str(), &st) == 0;
}

std::string join_path(const std::string& folder, const std::string& name) {
  if (folder.empty()) return name;
  return folder.back() == '/' ? folder + name : folder + "/" + name;
}

std::string parent_path(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const auto slash = p.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : p.substr(0, slash);
}

std::vector<std::string> list_directory(const std::string& folder) {
  DIR* dir = ::opendir(folder.c_str());
  if (!dir) throw Error(folder + ": cannot list the folder: " + errno_text());
  std::vector<std::string> names;
  while (dirent* entry = ::readdir(dir)) {
    const std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path + ": cannot open: " + errno_text());
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

namespace {

std::string trimmed(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

std::string host_name() {
  char buffer[256] = {};
  if (::gethostname(buffer, sizeof buffer - 1) != 0 || !buffer[0]) return "host";
  std::string name = buffer;
  for (char& c : name) {
    if (c == '/' || c == '-') c = '_';  // '-' separates the fields of the temporary name
  }
  return name;
}

std::string base_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

std::string make_temp_directory_beside(const std::string& destination, const std::string& kind) {
  static std::atomic<unsigned> counter{0};
  const std::string prefix = trimmed(destination) + ".tmp-" + host_name() + "-" + std::to_string(::getpid()) + "-" +
                             (kind.empty() ? "" : kind + "-");
  std::random_device random;
  for (int attempt = 0; attempt < 100; ++attempt) {
    const std::string path = prefix + std::to_string(random() % 1000000u) + std::to_string(counter++);
    // mkdir, not mkdtemp: mkdtemp's mode is 0700 whatever the umask.
    if (::mkdir(path.c_str(), 0777) == 0) return path;
    if (errno != EEXIST) throw Error(path + ": cannot create a temporary folder: " + errno_text());
  }
  throw Error(prefix + "*: cannot create a temporary folder: every name tried exists");
}

std::vector<std::string> clean_stale_temporaries(const std::string& destination_in) {
  const std::string destination = trimmed(destination_in);
  const std::string folder = parent_path(destination);
  const std::string name = base_name(destination);
  const std::string host = host_name();
  std::vector<std::string> notes;
  std::vector<std::string> entries;
  try {
    entries = list_directory(folder);
  } catch (const Error&) {
    return notes;  // no parent folder yet: nothing was left there
  }
  const std::string prefix = name + ".tmp-" + host + "-";
  for (const auto& entry : entries) {
    if (entry.rfind(prefix, 0) != 0) continue;
    const std::string rest = entry.substr(prefix.size());  // "<pid>-<n>" or "<pid>-old-<n>"
    const auto dash = rest.find('-');
    if (dash == std::string::npos || dash == 0) continue;
    const bool old = rest.compare(dash + 1, 4, "old-") == 0;
    const std::string pid_text = rest.substr(0, dash);
    if (pid_text.find_first_not_of("0123456789") != std::string::npos || pid_text.size() > 9) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(pid_text));
    if (pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;  // alive, or not ours to judge
    const std::string path = join_path(folder, entry);
    if (!is_directory(path)) continue;
    if (old && !path_exists(destination)) {
      // Killed between moving the old destination aside and moving the new one in: put the old one back.
      if (::rename(path.c_str(), destination.c_str()) == 0) {
        notes.push_back("restored " + destination + " from " + path + " (left by process " + pid_text +
                        ", which no longer runs)");
      }
      continue;
    }
    remove_tree_quietly(path);
    if (!path_exists(path)) {
      notes.push_back("removed " + path + " (a temporary folder left by process " + pid_text +
                      ", which no longer runs)");
    }
  }
  return notes;
}

StagedDirectory::StagedDirectory(std::string destination) : destination_(trimmed(std::move(destination))) {
  for (const auto& note : clean_stale_temporaries(destination_)) TORCH_WARN("tiedlora: ", note);
  path_ = make_temp_directory_beside(destination_);
}

StagedDirectory::~StagedDirectory() {
  if (!published_) remove_tree_quietly(path_);
}

void StagedDirectory::publish(bool overwrite) {
  publish_directory(path_, destination_, overwrite);
  published_ = true;
}

std::string resolve_path(const std::string& path) {
  std::string absolute = path;
  if (absolute.empty() || absolute[0] != '/') {
    char cwd[4096];
    if (!::getcwd(cwd, sizeof cwd)) throw Error("cannot read the current folder: " + errno_text());
    absolute = join_path(cwd, path);
  }
  std::vector<std::string> parts;
  for (std::size_t start = 0; start <= absolute.size();) {
    const std::size_t end = std::min(absolute.find('/', start), absolute.size());
    if (end > start) parts.push_back(absolute.substr(start, end - start));
    start = end + 1;
  }
  // realpath() of the longest prefix that exists, taken as written: the kernel applies ".." after following
  // a symbolic link, so ".." must not be removed before the links are resolved. Only the part that does not
  // exist yet is normalised by hand.
  for (std::size_t keep = parts.size() + 1; keep-- > 0;) {
    std::string prefix = "/";
    for (std::size_t i = 0; i < keep; ++i) prefix = join_path(prefix, parts[i]);
    char resolved[PATH_MAX];
    if (!::realpath(prefix.c_str(), resolved)) continue;
    std::string out = resolved;
    for (std::size_t i = keep; i < parts.size(); ++i) {
      if (parts[i] == ".") continue;
      if (parts[i] == "..") {
        out = parent_path(out);
        continue;
      }
      out = join_path(out, parts[i]);
    }
    return out;
  }
  return absolute;
}

bool lies_inside(const std::string& inner, const std::string& outer) {
  return outer == "/" ||
         (inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 && inner[outer.size()] == '/');
}

void check_output_apart_from_inputs(const std::string& output_label, const std::string& output,
                                    const std::vector<std::pair<std::string, std::string>>& inputs) {
  const std::string out = resolve_path(output);
  for (const auto& [label, input] : inputs) {
    if (input.empty()) continue;
    const std::string in = resolve_path(input);
    std::string relation;
    if (out == in)
      relation = "is";
    else if (lies_inside(in, out))
      relation = "contains";
    else if (lies_inside(out, in))
      relation = "lies inside";
    if (relation.empty()) continue;
    throw ConfigError(output_label + " " + output + " " + relation + " the " + label + " " + input +
                      (relation == "lies inside" ? "" : "; writing it would destroy that input") +
                      " (hint: choose an output folder outside every input)");
  }
}

void remove_tree(const std::string& path) {
  if (!path_exists(path)) return;
  auto remove_one = [](const char* p, const struct stat*, int, struct FTW*) -> int { return ::remove(p); };
  if (::nftw(path.c_str(), remove_one, 16, FTW_DEPTH | FTW_PHYS) != 0 && path_exists(path)) {
    throw Error(path + ": cannot remove: " + errno_text());
  }
}

void remove_tree_quietly(const std::string& path) noexcept {
  try {
    remove_tree(path);
  } catch (...) {
    // Cleanup is best effort: the caller is already reporting the error that matters.
  }
}

void make_directories(const std::string& path) {
  for (std::size_t i = 1; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      const std::string prefix = path.substr(0, i);
      if (::mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST) {  // the umask decides, as mkdir -p
        throw Error(path + ": cannot create folder " + prefix + ": " + errno_text());
      }
    }
  }
  if (!is_directory(path)) throw Error(path + ": exists and is not a folder");
}

void write_file_atomically(const std::string& path, const std::function<void(const ByteWriter&)>& fill) {
  static std::atomic<unsigned> counter{0};  // unique per call, so two threads writing one path do not collide
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);  // less the umask, as a plain creation
  if (fd < 0) throw Error(tmp + ": cannot create: " + errno_text());
  try {
    const ByteWriter write_bytes = [&](const void* data, std::size_t size) {
      const char* p = static_cast<const char*>(data);
      while (size > 0) {
        const ssize_t n = ::write(fd, p, std::min<std::size_t>(size, std::size_t{1} << 30));
        if (n < 0) {
          if (errno == EINTR) continue;
          throw Error(tmp + ": write failed: " + errno_text());
        }
        p += n;
        size -= static_cast<std::size_t>(n);
      }
    };
    fill(write_bytes);
    if (::fsync(fd) != 0) throw Error(tmp + ": fsync failed: " + errno_text());
    const int rc = ::close(fd);
    fd = -1;
    if (rc != 0) throw Error(tmp + ": close failed: " + errno_text());
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      throw Error(path + ": cannot rename " + tmp + " into place: " + errno_text());
    }
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable; failure here does not undo the write, so it is not an error.
  const int dir = ::open(parent_path(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

void copy_file(const std::string& from, const std::string& to) {
  const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) throw Error(from + ": cannot open: " + errno_text());
  // A plain creation's mode (0666 less the umask) that never grants what the source does not: a 0600 file
  // stays private.
  struct stat source{};
  const mode_t mode = ::fstat(in, &source) == 0 ? (source.st_mode & 0666) : 0600;
  const int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (out < 0) {
    ::close(in);
    throw Error(to + ": cannot create: " + errno_text());
  }
  std::vector<char> buffer(1 << 20);
  ssize_t n;
  bool ok = true;
  while ((n = ::read(in, buffer.data(), buffer.size())) > 0) {
    for (ssize_t done = 0; done < n;) {
      const ssize_t w = ::write(out, buffer.data() + done, static_cast<size_t>(n - done));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        ok = false;
        break;
      }
      done += w;
    }
    if (!ok) break;
  }
  ok = ok && n == 0 && ::fsync(out) == 0;
  ::close(in);
  ok = (::close(out) == 0) && ok;
  if (!ok) throw Error(to + ": copying " + from + " failed: " + errno_text());
}

void publish_directory(const std::string& staged, const std::string& destination_in, bool overwrite) {
  const std::string destination = trimmed(destination_in);  // "out/" is "out"
  std::string aside;
  if (path_exists(destination)) {
    if (!overwrite) {
      throw Error(destination + ": already exists (hint: choose another output folder or pass --force)");
    }
    aside = make_temp_directory_beside(destination, "old");
    ::rmdir(aside.c_str());
    if (::rename(destination.c_str(), aside.c_str()) != 0) {
      throw Error(destination + ": cannot move the old folder aside: " + errno_text());
    }
  }
  if (::rename(staged.c_str(), destination.c_str()) != 0) {
    const std::string reason = errno_text();
    if (!aside.empty()) ::rename(aside.c_str(), destination.c_str());
    throw Error(destination + ": cannot move " + staged + " into place: " + reason);
  }
  const int dir = ::open(parent_path(destination).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
  if (!aside.empty()) remove_tree_quietly(aside);  // the new folder is in place; a leftover is only clutter
}

}  // namespace tiedlora::util

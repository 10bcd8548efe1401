// process_group.cpp: the world of 1 and the text collectives built on a ProcessGroup's two tensor
// collectives (tiedlora/llm/distributed.h). The launcher and the engines are the distributed component's
// (src/distributed/).
#include <algorithm>
#include <cstring>

#include <ATen/ATen.h>

#include "tiedlora/llm/distributed.h"

namespace tiedlora::distributed {

namespace {

class SingleProcess final : public ProcessGroup {
 public:
  SingleProcess() : ProcessGroup(0, 1) {}
  std::string backend() const override { return "local"; }
  void all_reduce_sum(at::Tensor&, const std::string&) override {}
  void broadcast(at::Tensor&, int, const std::string&) override {}
  void abort(int) override {}
};

}  // namespace

std::shared_ptr<ProcessGroup> single_process() { return std::make_shared<SingleProcess>(); }

std::string broadcast_text(ProcessGroup& group, const std::string& text, int root, const std::string& what) {
  if (group.world_size() == 1) return text;
  at::Tensor length = at::tensor({static_cast<int64_t>(group.rank() == root ? text.size() : 0)}, at::kLong);
  group.broadcast(length, root, what + " (length)");
  at::Tensor bytes = at::zeros({length.item<int64_t>()}, at::kByte);
  if (group.rank() == root) std::memcpy(bytes.data_ptr(), text.data(), text.size());
  if (bytes.numel() > 0) group.broadcast(bytes, root, what);
  return std::string(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(bytes.numel()));
}

std::vector<std::string> all_gather_text(ProcessGroup& group, const std::string& text, const std::string& what) {
  if (group.world_size() == 1) return {text};
  // Each rank fills its own slot and leaves zeros elsewhere, so a sum gathers.
  at::Tensor lengths = at::zeros({group.world_size()}, at::kLong);
  lengths[group.rank()] = static_cast<int64_t>(text.size());
  group.all_reduce_sum(lengths, what + " (lengths)");
  std::vector<int64_t> offsets(group.world_size() + 1, 0);
  for (int r = 0; r < group.world_size(); ++r) offsets[r + 1] = offsets[r] + lengths[r].item<int64_t>();
  at::Tensor bytes = at::zeros({offsets.back()}, at::kByte);
  std::memcpy(static_cast<char*>(bytes.data_ptr()) + offsets[group.rank()], text.data(), text.size());
  if (bytes.numel() > 0) group.all_reduce_sum(bytes, what);
  std::vector<std::string> texts;
  const char* data = static_cast<const char*>(bytes.data_ptr());
  for (int r = 0; r < group.world_size(); ++r) texts.emplace_back(data + offsets[r], data + offsets[r + 1]);
  return texts;
}

std::pair<int64_t, int64_t> shard_range(int64_t count, int rank, int world_size) {
  const int64_t base = count / world_size, extra = count % world_size;
  const int64_t begin = rank * base + std::min<int64_t>(rank, extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

}  // namespace tiedlora::distributed

# The seed tutorial's code as one script, verbatim except for the data loading (keras -> the IDX files of Debian's
# dataset-fashion-mnist, or the folder given as a third argument). The side-by-side baseline for the speed goals
# (benchmarks/whole_job.py): `python benchmarks/tutorial_job.py adam 2` (the whole job), `... adam 15` (its 0.896).
# Prints per-epoch loss, test accuracy and timings.
import gzip, sys, time, numpy as np, torch
from torch import nn
D = (sys.argv[3] if len(sys.argv) > 3 else "/usr/share/datasets/fashion-mnist").rstrip("/") + "/"
def idx(name, off):
    with gzip.open(D + name) as f: return np.frombuffer(f.read(), np.uint8, offset=off)
X_train = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28); Y_train = idx("train-labels-idx1-ubyte.gz", 8)
X_test = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28); Y_test = idx("t10k-labels-idx1-ubyte.gz", 8)
X_train, X_test, Y_train, Y_test = torch.tensor(X_train, dtype=torch.float32), torch.tensor(X_test, dtype=torch.float32), torch.tensor(Y_train, dtype=torch.long), torch.tensor(Y_test, dtype=torch.long)
X_train, X_test = X_train.reshape(-1,1,28,28), X_test.reshape(-1,1,28,28)
X_train, X_test = X_train/255.0, X_test/255.0
classes = Y_train.unique()
print(X_train.shape, X_test.shape, Y_train.shape, Y_test.shape)
class ConvNet(nn.Module):
    def __init__(self):
        super(ConvNet, self).__init__()
        self.seq = nn.Sequential(
            nn.Conv2d(1, 32, (3,3), padding="same"), nn.ReLU(),
            nn.Conv2d(32, 16, (3,3), padding="same"), nn.ReLU(),
            nn.Conv2d(16, 8, (3,3), padding="same"), nn.ReLU(),
            nn.Flatten(), nn.Linear(8*28*28, len(classes)))
    def forward(self, x_batch): return self.seq(x_batch)
def TrainModelInBatches(model, loss_func, optimizer, X, Y, batch_size=32, epochs=5):
    for i in range(epochs):
        t = time.time()
        batches = torch.arange((X.shape[0]//batch_size)+1)
        losses = []
        for batch in batches:
            if batch != batches[-1]: start, end = int(batch*batch_size), int(batch*batch_size+batch_size)
            else: start, end = int(batch*batch_size), None
            X_batch, Y_batch = X[start:end], Y[start:end]
            preds = model(X_batch); loss = loss_func(preds, Y_batch); losses.append(loss)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
        print("Categorical Cross Entropy : {:.3f}   ({:.1f}s)".format(torch.tensor(losses).mean(), time.time()-t), flush=True)
def MakePredictions(model, input_data, batch_size=32):
    batches = torch.arange((input_data.shape[0]//batch_size)+1)
    with torch.no_grad():
        preds = []
        for batch in batches:
            if batch != batches[-1]: start, end = int(batch*batch_size), int(batch*batch_size+batch_size)
            else: start, end = int(batch*batch_size), None
            preds.append(model(input_data[start:end]))
    return preds
from torch.optim import SGD, Adam
from sklearn.metrics import accuracy_score, classification_report
opt_name, epochs = sys.argv[1], int(sys.argv[2])
torch.manual_seed(42)
learning_rate = torch.tensor(1/1e3); batch_size=128
conv_net = ConvNet(); cross_entropy_loss = nn.CrossEntropyLoss()
optimizer = (SGD if opt_name == "sgd" else Adam)(params=conv_net.parameters(), lr=learning_rate)
t0 = time.time()
TrainModelInBatches(conv_net, cross_entropy_loss, optimizer, X_train, Y_train, batch_size=batch_size, epochs=epochs)
t1 = time.time()
test_preds = torch.cat(MakePredictions(conv_net, X_test, batch_size=128)).argmax(dim=1)
train_preds = torch.cat(MakePredictions(conv_net, X_train, batch_size=128)).argmax(dim=1)
t2 = time.time()
print("Train Accuracy : {:.3f}".format(accuracy_score(Y_train, train_preds)))
print("Test  Accuracy : {:.3f}".format(accuracy_score(Y_test, test_preds)))
print(classification_report(Y_test, test_preds))
print(f"train_s={t1-t0:.1f} predict_s={t2-t1:.1f} train_img_per_s={epochs*60000/(t1-t0):.0f} predict_img_per_s={70000/(t2-t1):.0f}")
